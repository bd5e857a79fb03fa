"""LoadExperts' and RunExperts' status codes: a request naming what the model does not have is the caller's mistake
(INVALID_ARGUMENT); a checkpoint the shard cannot read is the shard's state (FAILED_PRECONDITION), not the caller's;
a bug in the forward is INTERNAL on every transport."""

from __future__ import annotations

import re

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


def _own_file(path, name: str):
    """Tensor `name` of tiny checkpoint `path` moved to a file of its own (a sharded checkpoint with an index, as
    transformers writes one), so that damage to that file fails only its expert's reads; returns that file."""
    import json

    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    own = {name: tensors.pop(name)}
    files = {"model-00001-of-00002.safetensors": tensors, "model-00002-of-00002.safetensors": own}
    for file, part in files.items():
        save_file(part, path / file, metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    total = sum(t.numel() * t.element_size() for part in files.values() for t in part.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": total}, "weight_map": {t: f for f, part in files.items() for t in part}}))
    return path / "model-00002-of-00002.safetensors"


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
    """A CPU shard asked for experts whose layer storage the host cannot map (here a spec whose intermediate size makes
    one expert 12 TiB, beyond RAM and swap) answers RESOURCE_EXHAUSTED naming the bytes, as a GPU shard's
    out-of-memory does; it was FAILED_PRECONDITION "[Errno 12] Cannot allocate memory", which blames the checkpoint.
    The shard holds nothing of it and keeps loading and serving. (A config.json saying so fails the open: the
    experts' shapes are checked against it, test_expert_shapes.)"""
    from dataclasses import replace

    from elasticmoe.model.tiny import make_tiny_model

    huge = open_model(str(make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)))
    spec = replace(huge.spec, moe=replace(huge.spec.moe, intermediate_size=1 << 34))
    store = ExpertStore(huge.ckpt, huge.names, spec, torch.float32, torch.device("cpu"))
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


def test_a_load_failing_at_one_expert_leaves_the_shard_as_it_was(tmp_path):
    """One LoadExperts over three layers whose last has an expert the file lies about (its w2's file, rewritten since
    the open, says I32):
    FAILED_PRECONDITION naming the file and the tensor, and the shard holds what it held before, bytes and all. The
    layers loaded before the bad one kept their new experts (the caller, told the load failed, could not know them):
    layer 0's that it held already with them (rebuilt back) and layer 1, which it did not hold (freed)."""
    import json
    import struct

    from elasticmoe.model.tiny import make_tiny_model

    path = make_tiny_model("mixtral", tmp_path / "m", layers=3, experts=E)
    bad = "model.layers.2.block_sparse_moe.experts.1.w2.weight"
    weights = _own_file(path, bad)
    files = open_model(str(path))  # I32 where a weight is fails the open (test_checkpoint_lies): the header lies later
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header[bad]["dtype"] = "I32"  # same size: only the expert's read fails
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text) + -len(text) % 8) + text + b" " * (-len(text) % 8) + raw[8 + n:])
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(0, 0), (0, 1)])
    server, _, port = start_server(store, "half-load")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    try:
        stub = pb_grpc.ExpertShardStub(ch)
        before = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        pairs = [(0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1)]
        with pytest.raises(grpc.RpcError) as e:
            _load(stub, pairs)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
        assert weights.name in e.value.details() and bad in e.value.details(), e.value.details()
        after = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert list(after.held) == list(before.held) and after.weight_bytes == before.weight_bytes, after
        assert store.held() == [(0, 0), (0, 1)] and store.weight_bytes() == before.weight_bytes
        assert store.snapshot(0).w13.shape[0] == 2 and store.snapshot(1) is None
        done = _load(stub, [p for p in pairs if p != (2, 1)])  # the others load as asked
        assert done.loaded == 5 and done.bytes_held == 7 * before.weight_bytes // 2
    finally:
        ch.close()
        server.stop(None).wait(10)


def test_an_fp8_expert_weight_without_fp8_config_is_failed_precondition(tmp_path):
    """An expert's w1 stored F8_E4M3 under a config.json with no FP8 quantization_config fails the open now (the
    shard does not start: test_quant); put there after the open, its load fails naming the file and the tensor,
    FAILED_PRECONDITION as any checkpoint the shard cannot read (a QuantError, a ValueError, was INVALID_ARGUMENT, the
    caller's mistake, though the request was sound). The shard serves the experts it holds and loads others."""
    from safetensors.torch import load_file, save_file

    from elasticmoe.experts.errors import placement_code
    from elasticmoe.gateway.transport import UnaryTransport
    from elasticmoe.model.quant import QuantError
    from elasticmoe.model.tiny import make_tiny_model
    from elasticmoe.rpc.frames import ExpertRequest

    assert placement_code(QuantError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)
    bad = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    weights = _own_file(path, bad)
    files = open_model(str(path))
    tensors = load_file(weights)
    tensors[bad] = tensors[bad].to(torch.float8_e4m3fn)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(QuantError, match=re.escape(f"{weights}: {bad!r} is F8_E4M3 but config.json has no")):
        open_model(str(path))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    server, _, port = start_server(store, "fp8-unscaled")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    t = UnaryTransport()
    try:
        stub = pb_grpc.ExpertShardStub(ch)
        assert _load(stub, [(0, 0)]).loaded == 1
        with pytest.raises(grpc.RpcError) as e:
            _load(stub, [(0, 1), (0, 2)])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (e.value.code(), e.value.details())
        assert f"{weights}: changed on disk" in e.value.details() and repr(bad) in e.value.details(), e.value.details()
        assert store.held() == [(0, 0)]
        req = ExpertRequest(0, torch.randn(3, files.spec.hidden_size), torch.zeros(3, 1, dtype=torch.int32),
                            torch.ones(3, 1))
        assert t.send(f"127.0.0.1:{port}", lambda: req, 10).result(timeout=20).output.data
        assert _load(stub, [(0, 2), (0, 3)]).loaded == 2
    finally:
        t.close()
        ch.close()
        server.stop(None).wait(10)
