"""LoadExperts / DropExperts wait for each other on the shard's placement lock, each holding a worker of the server's
pool: at most server.PLACEMENT_CALLS of them run or wait at once (more are refused "shard busy"), so Health and
RunExperts still find workers however many loads queue; a caller gone while its call waits changes nothing."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from elasticmoe.experts.server import PLACEMENT_CALLS
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.codec import channel_options, encode_tensor

E = 4


@pytest.fixture
def shard(tmp_path):
    """(stub, servicer, store, (a, b)): a small shard (2 RunExperts workers, 1 stream) holding every expert of MoE
    layer a and none of layer b."""
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E)))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    a, b = files.spec.moe.moe_layers
    store.load([(a, e) for e in range(E)])
    server, servicer, port = start_server(store, "placement", max_workers=2, max_streams=1)
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    yield pb_grpc.ExpertShardStub(ch), servicer, store, (a, b)
    ch.close()
    server.stop(None).wait(10)


def _load(pairs, version: int = 0) -> pb.LoadExpertsRequest:
    return pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs], placement_version=version)


def _run(stub, layer: int, timeout: float) -> pb.RunExpertsResponse:
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # [T, k]
    req = pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(torch.randn(2, 64)), topk_ids=encode_tensor(ids),
                               topk_weights=encode_tensor(torch.full((2, 2), 0.5)))
    return stub.RunExperts(req, timeout=timeout)


def _until(cond, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _a_place_free(servicer) -> bool:
    """Whether a LoadExperts / DropExperts would find a place now (one taken and given back at once to see)."""
    if not servicer._placement_calls.acquire(blocking=False):
        return False
    servicer._placement_calls.release()
    return True


def test_health_and_run_experts_answer_while_loads_queue(shard):
    """12 loads at once, each 0.5 s: Health and RunExperts answer at once meanwhile (with 12 callers waiting on the
    lock they found no worker, or gRPC's own concurrency limit refused them); the loads beyond PLACEMENT_CALLS are
    refused "shard busy" naming LoadExperts, the others load."""
    stub, servicer, store, (a, b) = shard
    servicer.faults.load_delay_s = 0.5
    loads = [stub.LoadExperts.future(_load([(b, i % E)], i + 1), timeout=30) for i in range(12)]
    time.sleep(0.2)  # the first load holds the lock, the others wait for it or were refused
    assert stub.Health(pb.HealthRequest(), timeout=2).ok
    ran = _run(stub, a, timeout=2)
    assert ran.output.data and not ran.missing
    assert sum(not f.done() for f in loads) >= 2  # loads were still queued when Health and RunExperts answered
    refused = [f.exception() for f in loads if f.exception() is not None]
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
        assert e.details().startswith(f"{frames.BUSY}: LoadExperts: {PLACEMENT_CALLS} ") and "ask again" in e.details()
    assert len(refused) >= 12 - PLACEMENT_CALLS
    done = [f.result() for f in loads if f.exception() is None]
    assert done and sum(r.loaded for r in done) == len({i % E for i, f in enumerate(loads) if f.exception() is None})
    assert stub.Health(pb.HealthRequest(), timeout=2).placement_version == max(r.placement_version for r in done)


def test_a_call_whose_caller_left_while_waiting_changes_nothing(shard):
    """A load holds the lock 3 s; the other PLACEMENT_CALLS - 1 places go to loads whose callers give up after
    0.3 s: they load nothing (without this, each loaded its experts once the lock was free, experts no one had
    asked for any more), and their places come back, so one of them asked again is taken and loads."""
    stub, servicer, store, (a, b) = shard
    servicer.faults.load_delay_s = 3.0
    first = stub.LoadExperts.future(_load([(b, 0)]), timeout=30)
    _until(servicer._placement.locked, "the first load holds the placement lock")
    gone = [stub.LoadExperts.future(_load([(b, e)]), timeout=0.3) for e in range(1, PLACEMENT_CALLS)]
    for f in gone:
        assert f.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # a waiting call sees its caller gone within 0.1 s and gives its place back (awaited, not slept for: a loaded
    # machine takes longer), while the first load still holds the lock (it loads (b, 0) after its 3 s)
    _until(lambda: _a_place_free(servicer), "a gone call's place given back")
    assert (b, 0) not in store.held()
    servicer.faults.load_delay_s = 0.0
    assert stub.LoadExperts(_load([(b, 1)]), timeout=10).loaded == 1  # a place was free for it
    assert first.result(timeout=10).loaded == 1
    assert store.held() == sorted([(a, e) for e in range(E)] + [(b, 0), (b, 1)])
