"""Shards that refuse a call without having failed, over real in-process shards: a full shard (busy) is asked again or
its call goes to another copy, and it is not reported to the controller as failed."""

from __future__ import annotations

import threading

import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from tests.test_failover import (ALL_BOTH, E, SPLIT, Shards, _inputs, _reference, _run, files,  # noqa: F401
                                 transport)

# start_server's arguments that leave no room for one more caller: every unary call, or every frame connection,
# is refused with RESOURCE_EXHAUSTED "shard busy: ..."
FULL = {"unary": {"max_workers": 0}, "socket": {"max_streams": 0}}


def _make_room(shards: Shards, i: int, transport: str) -> None:
    """Shard i takes calls again (a worker, or a frame connection, is free)."""
    if transport == "unary":
        shards.servicers[i]._run_slots = threading.BoundedSemaphore(4)
    else:
        shards.servers[i].listener.max_conns = 4


def _unreported(d: GrpcDispatcher, reported: list[str]) -> bool:
    """Nothing was reported: none queued or being reported (checked first), none reported already."""
    return not d._reporting and reported == []


def test_a_busy_shard_is_failed_over_and_not_reported(files, transport):
    shards = Shards(files, [list(range(E)), list(range(E))], {0: FULL[transport]})
    try:
        layer, inputs = shards.layers[0], _inputs(files, 7)
        ref = _reference(files, layer, *inputs)
        reported: list[str] = []
        d = GrpcDispatcher(transport=transport, timeout_s=5, on_failure=reported.append)
        d.set_table(shards.table(ALL_BOTH))
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and d.shard_tokens.get("s0", 0) == 0  # s0 refused: s1 computed it all
        assert _unreported(d, reported), reported
        assert [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
        d.close()
    finally:
        shards.close()


def test_a_busy_single_copy_is_asked_again_until_it_has_room(files, transport):
    """s0 holds the only copies of experts 0-3 and refuses at first: the step asks it again (no report, no new
    table to wait for) and gets its answer once it has room."""
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]], {0: FULL[transport]})
    try:
        layer, inputs = shards.layers[0], _inputs(files, 8)
        ref = _reference(files, layer, *inputs)
        reported: list[str] = []
        d = GrpcDispatcher(transport=transport, timeout_s=5, failover_s=10, on_failure=reported.append)
        d.set_table(shards.table(SPLIT))
        room = threading.Timer(0.3, _make_room, (shards, 0, transport))
        room.start()
        out, _ = _run(d, layer, inputs)
        room.join()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and d.shard_tokens.get("s0", 0) > 0
        assert _unreported(d, reported), reported
        d.close()
    finally:
        shards.close()
