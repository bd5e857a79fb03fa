"""LoadExperts' and RunExperts' status codes: a request naming what the model does not have is the caller's mistake
(INVALID_ARGUMENT); a checkpoint the shard cannot read is the shard's state (FAILED_PRECONDITION), not the caller's;
a bug in the forward is INTERNAL on every transport."""

from __future__ import annotations

import grpc
import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options

E = 4


@pytest.fixture
def shard(tmp_path):
    """A shard over its own tiny checkpoint (the tests break its file), holding nothing."""
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    server, _, port = start_server(store, "load-errors")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    yield pb_grpc.ExpertShardStub(ch), store, files, tmp_path / "m", f"127.0.0.1:{port}"
    ch.close()
    server.stop(None).wait(10)


def _load(stub, pairs):
    return stub.LoadExperts(pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs]),
                            timeout=30)


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_checkpoint_the_shard_cannot_read_is_failed_precondition(shard, damage):
    stub, store, files, path, _ = shard
    (weights,) = path.glob("*.safetensors")
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.unlink()
    with pytest.raises(grpc.RpcError) as e:
        _load(stub, [(l, x) for l in files.spec.moe.moe_layers for x in range(E)])
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
    assert weights.name in e.value.details()
    weights.write_bytes(data)  # repaired: the same request loads (nothing of the failed layer was kept)
    layer = files.spec.moe.moe_layers[0]
    assert _load(stub, [(layer, x) for x in range(E)]).loaded == E and store.held() == [(layer, x) for x in range(E)]


def test_an_expert_the_model_lacks_is_still_invalid_argument(shard):
    stub, store, _, _, _ = shard
    with pytest.raises(grpc.RpcError) as e:
        _load(stub, [(0, E)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"(0, {E})" in e.value.details()
    assert store.held() == []


def test_a_failing_forward_is_internal_on_every_transport(shard):
    """A bug in the shard's forward (here: it raises) answers INTERNAL naming it, through unary RunExperts as through
    the stream's and the socket's frames (unary said UNKNOWN, 'Exception calling application'); the shard lives on."""
    from elasticmoe.gateway.socket_transport import SocketTransport
    from elasticmoe.gateway.stream_transport import StreamTransport
    from elasticmoe.gateway.transport import UnaryTransport
    from elasticmoe.rpc.frames import ExpertRequest

    _, store, files, _, address = shard
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    req = ExpertRequest(layer, torch.randn(3, files.spec.hidden_size), torch.zeros(3, 2, dtype=torch.int32),
                        torch.ones(3, 2))
    forward = store.forward
    store.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    for t in (UnaryTransport(), StreamTransport(), SocketTransport()):
        try:
            with pytest.raises(grpc.RpcError) as e:
                t.send(address, lambda: req, 10).result(timeout=20)
            assert e.value.code() == grpc.StatusCode.INTERNAL and "boom" in e.value.details(), (t, e.value)
        finally:
            t.close()
    store.forward = forward
    assert UnaryTransport().send(address, lambda: req, 10).result(timeout=20).output.data


def test_experts_that_do_not_fit_in_memory_are_resource_exhausted(tmp_path):
    """A CPU shard asked for experts whose layer storage the host cannot map (here the config's intermediate size makes
    one expert 12 TiB, beyond RAM and swap) answers RESOURCE_EXHAUSTED naming the bytes, as a GPU shard's
    out-of-memory does; it was FAILED_PRECONDITION "[Errno 12] Cannot allocate memory", which blames the checkpoint.
    The shard holds nothing of it and keeps loading and serving."""
    import json

    from elasticmoe.model.tiny import make_tiny_model

    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 1 << 34
    (path / "config.json").write_text(json.dumps(config))
    huge = open_model(str(path))
    store = ExpertStore(huge.ckpt, huge.names, huge.spec, torch.float32, torch.device("cpu"))
    server, _, port = start_server(store, "too-big")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    try:
        stub = pb_grpc.ExpertShardStub(ch)
        layer = huge.spec.moe.moe_layers[0]
        with pytest.raises(grpc.RpcError) as e:
            _load(stub, [(layer, 0)])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
        assert "bytes" in e.value.details() and f"layer {layer}" in e.value.details(), e.value.details()
        assert store.held() == [] and stub.Health(pb.HealthRequest(), timeout=10).ok
    finally:
        ch.close()
        server.stop(None).wait(10)
