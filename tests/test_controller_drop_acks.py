"""Old copies are dropped only once every gateway runs the table current at the drop, over real in-process shards:
a table published while a drop waited for its acknowledgements may route to a copy the drop names (found by
test_controller_sequences' seed 3 under load: 'routed but not held')."""

from __future__ import annotations

import asyncio

from elasticmoe.autoscaler.registry import Change
from tests.controller_util import _gateway_behind_a_move, _moved, _routed_to, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


async def _move(ctrl, src: int, dst: int) -> None:
    cur = ctrl.registry.placement
    async with ctrl._lock:
        await ctrl._apply(Change(cur, _moved(cur, src, dst, 0), {0: 0, 1: 1}), "test move")


def test_a_drop_waits_for_the_tables_published_while_it_waited(model):  # noqa: F811
    """v2 moves expert 0 from a to b (a's copies to drop once g runs v2), v3 moves it back to a (a still holds it),
    v4 to b again. g runs v3, which routes expert 0 to a: v2's drop, its own acknowledgement in (g is past v2), read
    v4's placement and dropped a's copies under g's running table. It now waits until g runs v4."""
    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        moved = {(l, 0) for l in files.spec.moe.moe_layers}
        try:
            await _move(ctrl, 1, 0)  # v3: back to a
            t3 = await ctrl.table(old["version"], "g")  # g fetches v3
            assert moved <= _routed_to(t3, "a"), "v3 routes expert 0 to a"
            await ctrl.table(t3["version"], "g")  # g runs v3 (past v2: v2's drop goes ahead 0.5 s later)
            await _move(ctrl, 0, 1)  # v4: to b again, before that drop runs
            for _ in range(15):  # g runs v3 for 1.5 s: v2's drop (0.5 s after its acks) would have run
                assert await ctrl.table(t3["version"], "g") is not None  # g still on v3: a newer one waits
                assert moved <= a.held(), "a dropped expert 0 while g's table routes it there"
                await asyncio.sleep(0.1)
            await ctrl.table(ctrl.registry.version, "g")  # g runs v4 now
            await _until(lambda: not moved & a.held(), 10, "a's old copies dropped once g runs v4")
        finally:
            for task in list(ctrl._tasks):
                task.cancel()
    _with_shards(model, "ab", scenario)
