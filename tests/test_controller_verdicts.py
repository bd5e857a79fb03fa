"""Health verdicts that land late: a probe that began before a shard was found good again (its registration retry,
its ready answer) or re-registered under its id decides nothing about the shard as it is now."""

from __future__ import annotations

import asyncio

import pytest

from tests.controller_util import _quiet, _routed_to, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _late_verdict_for(ctrl, shard_id: str) -> asyncio.Event:
    """The controller's Health probe of `shard_id` began while the shard did not answer: it reports it dead, but
    only once the returned event is set (a slow probe: 2 attempts of 2 s). Other shards are probed for real."""
    real, gate = ctrl._alive, asyncio.Event()

    async def alive(address, sid, timeout=2.0):
        if sid == shard_id:
            await gate.wait()
            return False
        return await real(address, sid, timeout)

    ctrl._alive = alive
    return gate


async def _found_good_again(ctrl, b, how: str) -> None:
    """b answers again while the probe's verdict is on its way: `ready` - its registration retry (its ready answer
    was lost) finds it answering as itself and holding its assignment; `re-registered` - it was re-homed away
    meanwhile (another verdict), and its registration under the same id placed it again."""
    if how == "re-registered":
        async with ctrl._lock:
            await ctrl._lose("b", "health check failed")
        assert "b" not in ctrl.registry.shards
    plan = await ctrl.register("b", b.address)
    b.store.load(plan["experts"])
    await ctrl.ready("b")
    assert ctrl.registry.shards["b"].healthy and "b" in [s["id"] for s in (await ctrl.table())["shards"]]


async def _settled(ctrl) -> None:
    await _until(lambda: not ctrl._tasks, 30, "the controller's tasks")


@pytest.mark.parametrize("how", ["ready", "re-registered"])
def test_a_failure_reports_late_verdict_does_not_take_out_the_shard_found_good_since(model, how):  # noqa: F811
    """A gateway reported b; the check's probe began while b did not answer and landed after b was found good
    again: it took b out (re-homed its experts, removed it from the table) on evidence older than b's."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        gate = _late_verdict_for(ctrl, "b")
        await ctrl.report_failure("b")  # the check starts probing b
        await asyncio.sleep(0.1)
        await _found_good_again(ctrl, b, how)
        version = ctrl.registry.version
        gate.set()
        await _settled(ctrl)
        table = await ctrl.table()
        assert ctrl.registry.version == version and table["complete"]
        assert ctrl.registry.shards["b"].healthy and _routed_to(table, "b") and _routed_to(table, "b") <= b.held()

    _with_shards(model, "ab", scenario)


@pytest.mark.parametrize("how", ["ready", "re-registered"])
def test_a_health_rounds_late_verdict_does_not_take_out_the_shard_found_good_since(model, how):  # noqa: F811
    """The same for the health loop's round: its probes run outside the lock, so b's ready() (or its re-registration)
    can complete between b's probe and the verdict."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        gate = _late_verdict_for(ctrl, "b")
        health = asyncio.get_running_loop().create_task(ctrl._health_once())
        await asyncio.sleep(0.1)
        await _found_good_again(ctrl, b, how)
        version = ctrl.registry.version
        gate.set()
        await health
        await _settled(ctrl)
        table = await ctrl.table()
        assert ctrl.registry.version == version and table["complete"]
        assert ctrl.registry.shards["b"].healthy and _routed_to(table, "b") <= b.held()

    _with_shards(model, "ab", scenario)


def test_a_verdict_on_the_shard_as_it_still_is_takes_it_out(model):  # noqa: F811
    """The guard is no blanket: a late verdict with nothing newer about b still re-homes b's experts onto a."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        gate = _late_verdict_for(ctrl, "b")
        await ctrl.report_failure("b")
        await asyncio.sleep(0.1)
        gate.set()
        await _settled(ctrl)
        table = await ctrl.table()
        assert "b" not in ctrl.registry.shards and table["complete"] and [s["id"] for s in table["shards"]] == ["a"]

    _with_shards(model, "ab", scenario)
