"""Health verdicts during a long change, without Ray, over real in-process gRPC shards: a shard that dies while the
controller's lock is held (a scale out loading a whole shard) is out of the table within the health period, and
re-homed once the change is over."""

from __future__ import annotations

import asyncio
import time

from tests.controller_util import ControllerImpl, _args, _routed_to, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture

LOAD_S = 6.0  # the scale out's load onto the new shard: far longer than a health period (1 s) and its probes


def _out_of_table(ctrl, shard_id: str) -> bool:
    return shard_id not in [s["id"] for s in ctrl._table()["shards"]]


def test_a_shard_that_dies_during_a_long_scale_out_is_out_of_the_table_within_the_health_period(model):
    """c joins as a spare and the scale out onto it loads for LOAD_S under the controller's lock; b dies meanwhile.
    The health round probed b outside the lock but waited for the lock to record the verdict, so gateways were
    sent to dead b until the load ended. The verdict is recorded at once; the re-home waits for the change."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model))
        try:
            await a.join(ctrl)
            await b.join(ctrl)  # the loops run (health every second)
            c.servicer.faults.load_delay_s = LOAD_S
            grow = asyncio.get_running_loop().create_task(c.join(ctrl))  # ready(c): the scale out holds the lock
            await _until(lambda: ctrl._lock.locked() and "c" in ctrl.registry.shards, 5, "the scale out under way")
            await asyncio.sleep(0.3)
            b.server.stop(None)
            died = time.monotonic()
            await _until(lambda: _out_of_table(ctrl, "b"), LOAD_S - 1.5, "b out of the table during the load")
            took = time.monotonic() - died
            assert not grow.done() and ctrl._lock.locked(), "the scale out still loads"
            assert took < 3.0, f"b was routed to for {took:.1f} s after it died"
            assert not ctrl.registry.shards["b"].healthy and ctrl.registry.shards["b"].ready
            c.servicer.faults.load_delay_s = 0.0  # a retried scale out need not wait again
            await grow
            # after the change: b re-homed (out of the placement), c placed; the table routes only to what is held
            await _until(lambda: "b" not in ctrl.registry.shards and not ctrl.registry.spares()
                         and ctrl._table()["complete"], 20, "b re-homed and c placed")
            table = await ctrl.table()
            assert [s["id"] for s in table["shards"]] == ["a", "c"]
            assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, c)) and _routed_to(table, "c")
            ctrl.registry.placement.validate()
        finally:
            for task in list(ctrl._tasks):
                task.cancel()

    _with_shards(model, "abc", scenario)


def test_a_failure_report_during_a_long_change_takes_the_shard_out_at_once(model):
    """The same for a gateway's failure report: its check marks the dead shard failed without the lock, and
    re-homes it when the change is over."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model))
        try:
            await a.join(ctrl)
            await b.join(ctrl)
            for task in list(ctrl._tasks):
                task.cancel()  # no health loop: the report is the only check
            c.servicer.faults.load_delay_s = LOAD_S
            grow = asyncio.get_running_loop().create_task(c.join(ctrl))
            await _until(lambda: ctrl._lock.locked() and "c" in ctrl.registry.shards, 5, "the scale out under way")
            await asyncio.sleep(0.3)
            b.server.stop(None)
            await ctrl.report_failure("b")
            await _until(lambda: _out_of_table(ctrl, "b"), 2.5, "b out of the table during the load")
            assert not grow.done()
            c.servicer.faults.load_delay_s = 0.0
            await grow
            await _until(lambda: "b" not in ctrl.registry.shards, 10, "b re-homed after the change")
            table = await ctrl.table()
            assert table["complete"] and all(_routed_to(table, s["id"]) <= {"a": a, "c": c}[s["id"]].held()
                                             for s in table["shards"])
        finally:
            for task in list(ctrl._tasks):
                task.cancel()

    _with_shards(model, "abc", scenario)
