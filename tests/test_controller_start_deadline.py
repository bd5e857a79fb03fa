"""autoscaling.start_deadline_s: a position of the placement whose replica never comes up is given up (its experts
re-homed onto the live shards) and scaling goes on. The clock as a unit, then the controller without Ray over real
in-process gRPC shards."""

from __future__ import annotations

import asyncio

import pytest

from elasticmoe.autoscaler.registry import Change, Registry
from elasticmoe.placement import Placement
from tests.controller_util import _quiet, _routed_to, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _registry(n: int) -> Registry:
    return Registry(Placement.even(2, 8, n, 8, 1), [1, 2])


def test_a_position_is_overdue_once_it_has_had_no_live_shard_for_the_deadline():
    reg = _registry(3)
    for sid, ready in (("a", True), ("b", True), ("c", False)):
        reg.register(sid, f"127.0.0.1:{ord(sid)}")
        reg.shards[sid].ready = ready
    assert reg.overdue(100.0, 10.0) == []  # c's position (2) starts its clock now
    assert reg.overdue(109.9, 10.0) == []
    assert reg.overdue(110.0, 10.0) == [2]
    reg.shards["b"].healthy = False  # found dead: a clock of its own (the health loop re-homes it first)
    assert reg.overdue(115.0, 10.0) == [2] and reg.unstaffed == {1: 115.0, 2: 100.0}
    reg.mark_ready("c")
    reg.mark_ready("b")  # live again: both clocks stop
    assert reg.overdue(200.0, 10.0) == [] and reg.unstaffed == {}
    reg.shards["c"].ready = False
    assert reg.overdue(201.0, 10.0) == [] and reg.unstaffed == {2: 201.0}  # a new clock, not the old one


def test_a_position_keeps_its_clock_through_a_renumbering_and_a_retired_one_loses_it():
    """A replacement replica registering at the position, or a re-home renumbering it, does not restart the clock
    (a replica that never comes up is restarted by Serve over and over); a position that leaves has none."""
    reg = _registry(3)
    reg.register("a", "127.0.0.1:1").ready = True
    reg.register("b", "127.0.0.1:2")  # position 1, never ready
    assert reg.overdue(100.0, 10.0) == [] and reg.unstaffed == {1: 100.0, 2: 100.0}  # 2: none registered
    reg.forget("b")
    reg.register("b2", "127.0.0.1:3")  # its replacement takes position 1
    assert reg.overdue(105.0, 10.0) == [] and reg.unstaffed == {1: 100.0, 2: 100.0}
    current, relabel = reg.retire([0])  # say position 0 leaves (a re-home): 1 -> 0, 2 -> 1, 0 -> 2
    new = Placement.even(2, 8, 2, 8, 1)
    reg.commit(Change(current, new, relabel, remove=("a",)))
    assert reg.unstaffed == {0: 100.0, 1: 100.0} and reg.shards["b2"].position == 0
    assert reg.overdue(110.0, 10.0) == [0, 1]


def test_the_start_clocks_outlive_a_controller_restart():
    reg = _registry(2)
    import time

    reg.register("a", "127.0.0.1:1").ready = True
    reg.unstaffed = {1: time.monotonic() - 8.0}  # 8 s without a live shard
    again = Registry.restore(reg.record(), [1, 2])
    assert again.overdue(time.monotonic(), 10.0) == [] and again.overdue(time.monotonic() + 2.5, 10.0) == [1]


def _auto(**kw) -> dict:
    return {"autoscaling": {"min_shards": 1, "max_shards": 2, "start_deadline_s": 1.0, **kw}}


@pytest.mark.parametrize("starting", ["loading", "never registered"])
def test_a_position_that_never_comes_up_is_given_up_and_the_cluster_scales_in(model, starting):  # noqa: F811
    """2 shards: a is up, the other never is (b registered and loads for good; or no replica was ever placed).
    The position had no live shard for good: the table lacked its experts, rebalance and scale out waited for it
    and the warm-up never began (no scale in, however idle). After start_deadline_s its experts are re-homed onto
    a, the idle cluster scales in; b, should it get ready after all, joins as a spare and is placed."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, **_auto(scale_cooldown_s=0))  # no warm-up to wait for
        if starting == "loading":
            plan = await ctrl.register("b", b.address)
            assert plan["position"] == 1 and plan["experts"]
        await ctrl._health_once()  # the clock starts
        assert not (await ctrl.table())["complete"] and ctrl.registry.placement.num_shards == 2
        await asyncio.sleep(1.1)
        await ctrl._health_once()
        table = await ctrl.table()
        assert table["complete"] and [s["id"] for s in table["shards"]] == ["a"] and _routed_to(table, "a") <= a.held()
        assert ctrl.registry.placement.num_shards == 1 and ctrl.registry.staffed() and "b" not in ctrl.registry.shards
        assert ctrl.event_counts.get("given_up") == 1
        await ctrl._stats_once()  # the baseline
        await ctrl._stats_once()  # idle
        assert ctrl.desired == 1
        if starting == "loading":  # b's ready is refused (not registered): its retry registers it again, a spare
            with pytest.raises(KeyError):
                await ctrl.ready("b")
            await b.join(ctrl)
            table = await ctrl.table()
            assert [s["id"] for s in table["shards"]] == ["a", "b"] and table["complete"]
            assert _routed_to(table, "b") and all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b))

    _with_shards(model, "ab", scenario)


def test_without_a_live_shard_nothing_is_given_up(model):  # noqa: F811
    """Every position still starting: there is nothing to re-home onto, so the deadline gives up none."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, **_auto())
        await ctrl.register("a", a.address)
        for task in list(ctrl._tasks):
            task.cancel()  # the rounds below are the only ones
        await ctrl._health_once()
        await asyncio.sleep(1.1)
        await ctrl._health_once()
        assert ctrl.registry.placement.num_shards == 2 and "a" in ctrl.registry.shards
        assert not ctrl.event_counts.get("given_up")

    _with_shards(model, "ab", scenario)


def test_a_slow_start_within_the_deadline_is_waited_for(model):  # noqa: F811
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, **_auto(start_deadline_s=30.0))
        plan = await ctrl.register("b", b.address)
        for _ in range(3):
            await ctrl._health_once()
        b.store.load(plan["experts"])
        await ctrl.ready("b")
        await _until(lambda: ctrl.registry.staffed(), 1, "b live")
        assert ctrl.registry.placement.num_shards == 2 and not ctrl.event_counts.get("given_up")

    _with_shards(model, "ab", scenario)
