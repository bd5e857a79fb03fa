"""The controller's health decisions without Ray, over real in-process gRPC shards: what takes a shard out of the
table and what may put it back in."""

from __future__ import annotations

from tests.controller_util import ControllerImpl, _args, _routed_to, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _health_fails_for(ctrl, dead: set[str]) -> None:
    """The controller's Health probe fails for the shard ids in `dead` (a wedged gRPC server), answers for others."""
    real = ctrl._alive

    async def alive(address, shard_id, timeout=2.0):
        return shard_id not in dead and await real(address, shard_id, timeout)

    ctrl._alive = alive


def test_a_shard_declared_dead_is_not_routed_to_again_by_registering(model):
    """The health check declared b dead and its re-home failed (b stays registered, out of the table). b's
    registration retry (its ready answer was lost) went through Ray, not through b's gRPC server: register()
    marked b healthy again, so every table routed b's experts to a shard that the health check had just found dead
    (and, re-registering every ~2 s, it undid each verdict). b is back only once ready() has found it answering and
    holding its assignment (or the health loop revives it)."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the rounds below are the only ones
        _health_fails_for(ctrl, {"b"})
        a.servicer.faults.fail_loads = 1  # re-homing b's experts onto a fails: b stays registered, unhealthy
        await ctrl._health_once()
        assert ctrl.event_counts.get("rehome_failed") == 1 and not ctrl.registry.shards["b"].healthy
        assert [x["id"] for x in (await ctrl.table())["shards"]] == ["a"]

        plan = await ctrl.register("b", b.address)  # the retry
        assert plan["published"]
        table = await ctrl.table()
        assert [x["id"] for x in table["shards"]] == ["a"] and not table["complete"]

        b.store.load(plan["experts"])
        await ctrl.ready("b")  # b answers GetStats as itself and holds its assignment: back in the table
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b))

    _with_shards(model, "ab", scenario)
