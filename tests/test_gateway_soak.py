"""A gateway runs for weeks: whatever it keeps per request (normal, cancelled, its client gone, past its deadline,
refused as invalid, failed for want of shards), per shard call, per shard restart and per placement change must go
when they do. A whole gateway in-process (tests/soak_util.py: the engine over real gRPC shards, the direct gRPC port
and the HTTP API) serves a few hundred requests of every kind while shards fail, restart on their ports and leave
and rejoin its table; afterwards its threads, file descriptors, per-request objects and every map it keeps per
request, call, connection or shard are exactly what they were before, and what a failure left was freed as it ended,
not left in reference cycles holding a failed step's tensors until a full garbage collection."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from elasticmoe.heap import freeze_startup_heap
from tests.soak_util import (CAPACITY, REQUESTS, Rig, at_once, grpc_longer, grpc_stream, held, http_chat_stream,
                             objects, settled, wait_idle)

ROUNDS = 10  # of one request of each kind at once (11 kinds); every other round, a fault, a burst or a table change
FAILING = (grpc_stream, http_chat_stream)  # the requests while every shard is down (each attempt fails: slow)


@pytest.fixture(params=["socket", "stream"])  # the default, and the other transport that multiplexes calls
def rig(request, tmp_path):
    rig = Rig(tmp_path, request.param)
    freeze_startup_heap()  # as a gateway replica does once started: the objects counted are those of serving
    yield rig
    gc.unfreeze()
    rig.close()


def _round(rig: Rig, r: int) -> list[str]:
    """One request of each kind; on odd rounds, beside them, in turn: every shard down, a shard restarted, a burst, a
    straggler, a placement change (last: the connections it retires end on shards that then stay up)."""
    fault = r % 10
    if fault % 2 == 0:
        return at_once(rig)
    if fault == 1:  # every copy gone: the requests fail (UNAVAILABLE, 503), then both shards come back
        rig.stop(0)
        rig.stop(1)
        rig.dispatcher.failover_s = 0.05  # each attempt waits this long for a table with another copy: none comes
        try:
            return at_once(rig, FAILING, failing=True)
        finally:
            rig.dispatcher.failover_s = 1.0
            rig.start(0)
            rig.start(1)
    if fault == 3:  # shard s0 dies mid-traffic and comes back on its port: its calls fail over to s1
        out: list[str] = []
        t = threading.Thread(target=lambda: out.extend(at_once(rig)))
        t.start()
        time.sleep(0.05)
        rig.stop(0)
        rig.start(0)
        t.join(60)
        return out
    if fault == 5:  # more requests at once than the gateway takes: the last ones refused (429's gRPC twin)
        return at_once(rig, (grpc_longer,) * (CAPACITY + 2))
    if fault == 7:  # s0 straggles: its calls are hedged to s1, and it owes answers a while
        rig.shards[0][1].faults.run_delay_s = 0.3
        try:
            return at_once(rig)
        finally:
            rig.shards[0][1].faults.run_delay_s = 0.0
    wait_idle(rig, time.monotonic() + 15)  # s1 leaves the table while idle (its connection retired, no call on it)
    rig.route([0])
    out = at_once(rig)  # (the table is installed as the first of them starts)
    rig.route([0, 1])
    return out


def _compare(rig: Rig, before: dict, timeout_s: float = 10.0) -> dict:
    """held(rig) once it equals `before` (connections retired, threads ending take a moment), else as it is then."""
    deadline = time.monotonic() + timeout_s
    while (now := held(rig)) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def _done(rig: Rig) -> dict[str, int]:
    """What the churn did, counted: requests by outcome, refusals, failed requests, failovers, hedges, reports."""
    m, d = rig.metrics.requests, rig.dispatcher
    out = {f"{api} {status}": m.get((api, status), 0) for api, status in sorted(REQUESTS)}
    return {**out, "refused": rig.runner.refused, "failed": rig.runner.engine.failed_requests,
            "failovers": d.failovers, "hedges": d.hedges, "reports": len(rig.reports)}


def test_a_few_hundred_requests_of_every_kind_amid_faults_leave_nothing_behind(rig):
    assert not at_once(rig)  # every kind and event once: pools and caches at their working size; the placement
    for r in (9, 1):  # change first (the restarts after it start shards afresh: what it leaves there shows)
        assert not _round(rig, r)
    settled(rig)
    before = held(rig)
    assert rig.runner.capacity == CAPACITY and before["engine"]["free_slots"] == 4
    assert before["runner"] == {"streams": 0, "admitted": 0, "refused_groups": 0}
    done, bad = _done(rig), []
    gc.disable()  # what the churn leaves to the cyclic collector stays, to be counted
    try:
        for r in range(ROUNDS):
            bad += [f"round {r}: {b}" for b in _round(rig, r)]
        settled(rig)
        uncollected = objects(collect=False)
    finally:
        gc.enable()
    assert not bad, bad[:5]
    did = {k: v - done[k] for k, v in _done(rig).items()}
    assert all(did.values()), did  # every outcome, refusal, failure, failover, hedge and report happened
    # the steps, calls, sequences and streams of failed calls and requests freed as they ended, none left in a
    # cycle for the full collection a serving process may not run for minutes (a cancelled request's RequestStream
    # is: asyncio's cancellation keeps the task's frames in a cycle of its own)
    freed = {k: n for k, n in uncollected.items() if k != "RequestStream"}
    assert freed == {k: before["objects"][k] for k in freed}, freed
    after = _compare(rig, before)
    changed = {k: v for k, v in after.items() if v != before[k]}
    assert changed == {}, {k: before[k] for k in changed}  # (what it was before)
