"""A RunExpertsStream whose reading thread dies of something other than its client leaving (here a MemoryError joining
an answer) ends with a clear status: its frames not yet answered fail at once, and the gateway fails them over (out
of memory: RESOURCE_EXHAUSTED "shard out of memory", not reported). Nothing ended the stream before: later frames
went unread until their deadlines. Over a real shard in its own process: once armed, the shard caps its address space
(RLIMIT_AS) just after it has computed a frame of BIG tokens routed to no expert (its [T, H] float64 answer of zeros,
64 MiB), ROOM above its size then, so the answer's join (64 MiB more) is refused by the kernel; its next frame lifts
the cap. (A cap set once, before the frame, left a window of room in which compute fit and the join did not that
moved with the host's allocator: it failed once in CI.)"""

from __future__ import annotations

import os
import time

import grpc
import pytest
import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.transport import is_short, make_transport
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from tests.capped_shard import MALLOC, capped_shard
from tests.shard_util import Shards

E, H = 4, 64
BIG = 1 << 17  # tokens: hidden [BIG, H] float32 32 MiB in, zeros [BIG, H] float64 64 MiB out, its join 64 MiB more
ROOM = 16 << 20  # what the shard may map beyond its size once BIG's answer is computed: far from the join's 64 MiB
DEADLINE_S = 15.0  # the calls' deadline: what the frames behind the dead reader waited for before

SHARD = r"""
import json, resource, sys, threading, torch
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

BIG, ROOM = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)  # no intra-op threads to start once capped
threading.stack_size(256 << 10)  # threads started while capped (a new stream's reader) map 256 KiB stacks, not 8 MiB
files = open_model(sys.argv[1])
store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
store.load([(l, e) for l in files.spec.moe.moe_layers for e in range(files.spec.moe.num_experts)])
server, servicer, port = start_server(store, "capped", max_rows=1 << 18)
compute, armed = servicer._compute, threading.Event()
vm = lambda: int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmSize"].split()[0]) << 10


def capping_compute(frame, context):  # armed: a BIG frame's answer is computed, then the cap (lifted by the next frame)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out = compute(frame, context)
    if armed.is_set() and getattr(out[0], "shape", (0,))[0] == BIG:
        resource.setrlimit(resource.RLIMIT_AS, (vm() + ROOM, resource.RLIM_INFINITY))
    return out


servicer._compute = capping_compute
print(json.dumps({"port": port}), flush=True)
sys.stdin.readline()  # the test has warmed the server up
armed.set()
print(json.dumps({"capped": vm()}), flush=True)
sys.stdin.readline()
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
server.stop(None).wait(10)
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return str(make_tiny_model("mixtral", tmp_path_factory.mktemp("reader") / "m", layers=2, experts=E, hidden=H))


@pytest.fixture
def capped(model):
    """(address, layer) of a shard process holding every expert, armed once a stream has brought it a small frame and
    the BIG one, both answered (not capped: armed only after): its next BIG frame's answer cannot be joined (one
    process per test)."""
    with capped_shard(SHARD, model, BIG, ROOM, env={**os.environ, **MALLOC}) as shard:
        layer = open_model(model).spec.moe.moe_layers[0]
        t = make_transport("stream", insecure=False)
        assert t.send(shard.address, lambda: _small(layer), 30).result(timeout=60).output is not None
        assert t.send(shard.address, lambda: _unroutable(layer), 30).result(timeout=60).output is not None
        t.close()
        shard.cap()
        yield shard.address, layer


def _small(layer: int, n: int = 4) -> ExpertRequest:
    """n tokens to experts 0 and 1: hidden [n, H], ids [n, 2], weights [n, 2]."""
    g = torch.Generator().manual_seed(n)
    return ExpertRequest(layer, torch.randn(n, H, generator=g), torch.tensor([[0, 1]] * n, dtype=torch.int32),
                         torch.rand(n, 2, generator=g))


def _unroutable(layer: int) -> ExpertRequest:
    """BIG tokens routed to no expert (ids -1): a valid frame whose answer is BIG rows of zeros."""
    g = torch.Generator().manual_seed(0)
    return ExpertRequest(layer, torch.randn(BIG, H, generator=g), torch.full((BIG, 2), -1, dtype=torch.int32),
                         torch.rand(BIG, 2, generator=g))


def _reference(model: str, req: ExpertRequest) -> torch.Tensor:
    files = open_model(model)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(req.layer, e) for e in range(E)])
    return LocalDispatcher(store).dispatch(req.layer, req.hidden, req.topk_ids, req.topk_weights).wait()


def test_a_dead_reader_ends_the_stream_and_its_frames_fail_at_once(capped, model):
    """The frame whose answer cannot be joined and a small one behind it both fail within seconds (they waited for
    their deadlines), out of memory, naming the reader; the shard then answers on a new stream."""
    address, layer = capped
    t = make_transport("stream", insecure=False)
    try:
        t0 = time.perf_counter()
        calls = [t.send(address, lambda: _unroutable(layer), DEADLINE_S), t.send(address, lambda: _small(layer),
                                                                                 DEADLINE_S)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call.result(timeout=60)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
            assert e.value.details() == (f"{frames.OUT_OF_MEMORY}: the stream's reader stopped (MemoryError); its "
                                         "frames not answered end here") and is_short(e.value)
        assert time.perf_counter() - t0 < 5, time.perf_counter() - t0
        out = t.send(address, lambda: _small(layer), DEADLINE_S).result(timeout=60)  # the shard serves on
        torch.testing.assert_close(decode_tensor(out.output).float(), _reference(model, _small(layer)),
                                   rtol=1e-5, atol=1e-6)
    finally:
        t.close()


def test_a_step_queued_behind_a_dead_reader_fails_over_at_once_unreported(capped, model):
    """s0 (capped) and s1 (in-process) hold every expert, half the tokens each; the step's call to s0 waits on the
    stream behind the frame that kills its reader: it fails over to s1 at once (it waited DEADLINE_S, then s0 was
    reported), and s0 is not reported (no hedge: hedge_min_s is beyond the deadline)."""
    address, layer = capped
    other = Shards(open_model(model), [list(range(E))])
    reported: list[str] = []
    d = GrpcDispatcher(transport="stream", timeout_s=DEADLINE_S, failover_s=30, hedge_min_s=60,
                       on_failure=reported.append)
    try:
        d.set_table(RoutingTable.from_dict({"version": 1, "layers": {layer: [[(0, 0.5), (1, 0.5)]] * E}, "shards": [
            {"id": "s0", "address": address}, {"id": "s1", "address": other.addresses[0]}]}))
        killer = d.transport.send(address, lambda: _unroutable(layer), DEADLINE_S)  # another call on the stream
        req = _small(layer, 64)
        t0 = time.perf_counter()
        out = d.dispatch(layer, req.hidden, req.topk_ids, req.topk_weights).wait()
        assert time.perf_counter() - t0 < 5, time.perf_counter() - t0
        torch.testing.assert_close(out, _reference(model, req), rtol=1e-5, atol=1e-6)
        assert is_short(killer.exception(timeout=10))
        assert d.failovers >= 1 and set(d.shard_tokens) == {"s1"}, (d.failovers, d.shard_tokens)  # s0's share too
        assert not d._reporting and reported == [] and [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
    finally:
        d.close()
        other.close()
