"""A shard's busy time (GetStats busy_us) and the utilization the controller scales on: calls that overlap (several
gateways, micro-batches) count once, so a shard is never more than 100% busy."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options
from elasticmoe.rpc.frames import ExpertRequest

E, K, T = 8, 2, 256


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("busy") / "m", layers=2, experts=E)))


def _store(files) -> ExpertStore:
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(l, e) for l in files.spec.moe.moe_layers for e in range(E)])
    return store


def _hammer(files, address: str, callers: int, seconds: float) -> float:
    """`callers` threads calling RunExperts (T tokens each) back to back for `seconds`; returns the wall time."""
    layer = files.spec.moe.moe_layers[0]
    g = torch.Generator().manual_seed(0)
    req = ExpertRequest(layer, torch.randn(T, files.spec.hidden_size, generator=g),
                        torch.randint(0, E, (T, K), generator=g, dtype=torch.int32), torch.rand(T, K, generator=g))
    ch = tls.channel(address, channel_options())
    stub, t0 = pb_grpc.ExpertShardStub(ch), time.monotonic()

    def loop() -> None:
        while time.monotonic() - t0 < seconds:
            stub.RunExperts(req.to_proto(), timeout=30)

    threads = [threading.Thread(target=loop) for _ in range(callers)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        ch.close()
    return time.monotonic() - t0


def test_busy_time_counts_overlapping_calls_once(files):
    """4 callers at once on a real shard: the calls' compute times sum to more than the wall time (they overlap),
    and busy_us, their union, stays within it and covers most of it (the shard was busy nearly throughout)."""
    store = _store(files)
    server, _, port = start_server(store, "busy")
    stub = pb_grpc.ExpertShardStub(ch := tls.channel(f"127.0.0.1:{port}", channel_options()))
    try:
        before = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        t0 = time.monotonic()
        _hammer(files, f"127.0.0.1:{port}", 4, 1.5)
        after = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        wall = time.monotonic() - t0
    finally:
        ch.close()
        server.stop(None)
    assert after.HasField("busy_us")
    summed, busy = (after.compute_us - before.compute_us) / 1e6, (after.busy_us - before.busy_us) / 1e6
    assert summed > 1.3 * wall, (summed, wall)  # the calls did overlap
    assert 0.5 * wall < busy <= wall, (busy, wall)


def test_busy_time_includes_the_stretch_running_now(files):
    """A shard computing without a break (a call always in flight) is busy all along: a read in the middle of the
    stretch counts it up to now, not 0 until it ends."""
    store = _store(files)
    # each event of the shard's clock (time.perf_counter) bracketed by two readings of the test's: a bound on how
    # long the sleeps really took, which a loaded machine stretches (0.2 s slept, 0.3 s counted, is right)
    a0 = time.perf_counter()
    with store.computing():
        a1 = time.perf_counter()  # the stretch began within [a0, a1]
        time.sleep(0.2)
        b0 = time.perf_counter()
        mid = store.stats().busy_us
        b1 = time.perf_counter()
        with store.computing():  # a second call inside the first: still one stretch
            time.sleep(0.1)
        c0 = time.perf_counter()
    c1 = time.perf_counter()  # the stretch ended within [c0, c1]
    end = store.stats().busy_us
    assert (b0 - a1) * 1e6 - 1 <= mid <= (b1 - a0) * 1e6 + 1 and mid >= 0.2e6, (mid, b0 - a1, b1 - a0)
    assert (c0 - a1) * 1e6 - 1 <= end <= (c1 - a0) * 1e6 + 1 and end >= 0.3e6, (end, c0 - a1, c1 - a0)
    time.sleep(0.1)
    assert store.stats().busy_us == end  # idle: no more


def test_the_controller_reads_utilization_within_one_under_overlapping_calls(files):
    """The controller's stats round over a real shard that 4 callers keep busy: the shard's utilization, which the
    shard count follows (its work = the sum over shards), is at most 1. From the summed compute_us it read about
    2.4 on this CPU, and asked for 2-3 times the shards the load needed."""
    import asyncio

    from elasticmoe.autoscaler.record import GcsRecord
    from tests.controller_util import ControllerImpl, _args

    store = _store(files)
    server, _, port = start_server(store, "a")
    address = f"127.0.0.1:{port}"
    GcsRecord("default").clear()

    async def scenario():
        ctrl = ControllerImpl(_args(str(files.ckpt.path), num_shards=1, autoscaling={"min_shards": 1, "max_shards": 8}))
        await ctrl.register("a", address)
        await ctrl.ready("a")
        for task in list(ctrl._tasks):
            task.cancel()
        await ctrl._stats_once()  # the baseline
        await asyncio.to_thread(_hammer, files, address, 4, 1.5)
        await ctrl._stats_once()
        return ctrl.load.utilization["a"]

    try:
        utilization = asyncio.run(scenario())
    finally:
        server.stop(None)
    assert 0.4 < utilization <= 1.0, utilization


def test_a_shard_without_busy_time_falls_back_to_its_summed_compute():
    """A shard of the release before (a redeploy in progress) answers no busy_us: its summed compute_us stands in;
    a shard that answers busy_us 0 (idle since start) is idle, whatever compute_us says."""
    from elasticmoe.autoscaler.stats import _busy_s

    assert _busy_s(pb.GetStatsResponse(compute_us=3_000_000)) == 3.0
    assert _busy_s(pb.GetStatsResponse(compute_us=3_000_000, busy_us=0)) == 0.0
    assert _busy_s(pb.GetStatsResponse(compute_us=3_000_000, busy_us=1_500_000)) == 1.5
