"""The controller's membership without Ray, over real in-process gRPC shards: shards join, are lost and re-homed,
drain, a failed load is rolled back, and what every published table says along the way."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.model import open_model
from tests.controller_util import (E, ControllerImpl, Shard, _args, _live_copies, _quiet, _routed_to, _until,
                                   _with_shards)
from tests.controller_util import model  # noqa: F401 - a fixture


def test_lose_restart_drain_and_a_failed_load(model):
    files = open_model(model)
    GcsRecord("default").clear()
    asyncio.run(_scenario(files, model))


async def _scenario(files, model):
    a, b, c = Shard(files, "a"), Shard(files, "b"), Shard(files, "c")
    try:
        ctrl = ControllerImpl(_args(model, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)
        table = await ctrl.table()
        assert table["complete"] and len(table["shards"]) == 2
        assert all(n == 2 for row in _live_copies(table) for n in row)  # every expert on both shards
        v0 = table["version"]

        # lose b: every table published along the way keeps a live copy of every expert (make-before-break)
        seen: list[dict] = []
        b.server.stop(None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            t = await ctrl.table()
            seen.append(t)
            if len(t["shards"]) == 1 and "b" not in ctrl.registry.shards:
                break
            await asyncio.sleep(0.05)
        assert "b" not in ctrl.registry.shards and ctrl.event_counts.get("removed") == 1
        assert all(t["complete"] for t in seen) and all(n >= 1 for row in _live_copies(seen[-1]) for n in row)
        assert a.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(E)}
        assert (await ctrl.heartbeat("b", b.address))["known"] is False  # a zombie b would be replaced
        assert ctrl.metrics.rebalance_reasons == {"rehome": 1}  # elasticmoe_rebalance_events_total{reason}

        # restart: a new controller resumes from the record and the shards' holdings; versions only grow
        v1 = ctrl.registry.version
        for task in ctrl._tasks:
            task.cancel()
        ctrl2 = ControllerImpl(_args(model, expert_copies=2))
        assert ctrl2.recovering and ctrl2.registry.version > v1 > v0
        ctrl2._start()
        await _until(lambda: not ctrl2.recovering, 10, "recovery")
        table = await ctrl2.table()
        assert table["complete"] and [s["id"] for s in table["shards"]] == ["a"]
        assert (await ctrl2.heartbeat("a", a.address))["known"] is True

        # a spare whose first load fails: rolled back, nothing leaked, the old placement stays; the next one works
        c.servicer.faults.fail_loads = 1
        await c.join(ctrl2)
        assert ctrl2.registry.placement.num_shards == 1 and c.held() == set()
        assert ctrl2.event_counts.get("load_failed") == 1
        assert (await ctrl2.table())["complete"]
        async with ctrl2._lock:
            await ctrl2._grow()
        table = await ctrl2.table()
        assert table["complete"] and {s["id"] for s in table["shards"]} == {"a", "c"} and c.held()
        assert ctrl2.metrics.rebalance_reasons == {"scale_out": 1}  # the failed load counted nothing

        # drain c (scale-in): its experts are loaded elsewhere before it leaves the table
        table = await ctrl2.drain("c")
        assert table["complete"] and [s["id"] for s in table["shards"]] == ["a"]
        assert a.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(E)}
        assert ctrl2.metrics.rebalance_reasons == {"scale_out": 1, "scale_in": 1}
        for task in ctrl2._tasks:
            task.cancel()
    finally:
        for s in (a, b, c):
            s.server.stop(None)


def test_two_shards_lost_together_are_re_homed(model):
    """Two of four shards die at once (a node goes): the re-home of either must not plan copies onto the other
    (loads there fail, and each retry failed the same way: the table stayed incomplete for good). One health
    round finds both dead: neither re-home tries the other (no failed load)."""
    async def scenario(files, a, b, c, d):
        ctrl = ControllerImpl(_args(model, num_shards=4))
        for s in (a, b, c, d):
            await s.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the health round below is the only one
        b.server.stop(None)
        c.server.stop(None)
        await ctrl._health_once()
        assert set(ctrl.registry.shards) == {"a", "d"} and not ctrl.event_counts.get("load_failed")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "d"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, d))

    _with_shards(model, "abcd", scenario)


def test_scale_out_after_scaling_in_to_one_shard(model):
    """4 shards (3 slots each for 8 experts) drained down to 1 (which then holds all 8), then a new replica joins:
    the placement grows onto it. Planning 2 shards with the initial 3 slots each (6 < 8 experts) raised
    ValueError out of ready(), so the new replica never joined."""
    async def scenario(files, *shards):
        a, e = shards[0], shards[-1]
        ctrl = ControllerImpl(_args(model, num_shards=4))
        assert ctrl.slots == 3
        for s in shards[:4]:
            await s.join(ctrl)
        for s in shards[1:4]:
            await ctrl.drain(s.shard_id)
        assert ctrl.registry.placement.num_shards == 1
        await e.join(ctrl)
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "e"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, e)) and _routed_to(table, "e")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abcde", scenario)


def test_a_replacement_registering_during_a_re_home_holds_only_its_assignment(model):
    """b dies and its experts are being loaded elsewhere when its replacement e registers: e must not be handed
    b's position (and b's experts to load) that the re-home is about to retire, or e ends up a spare holding
    copies no placement assigns it, which are never dropped (more than its slots)."""
    async def scenario(files, a, b, c, e):
        ctrl = ControllerImpl(_args(model, num_shards=3))
        for s in (a, b, c):
            await s.join(ctrl)
        b.server.stop(None)

        async def health_loop_loses_b():
            async with ctrl._start():
                await ctrl._lose("b", "health check failed")

        lose = asyncio.ensure_future(health_loop_loses_b())
        while ctrl.registry.shards["b"].healthy:
            await asyncio.sleep(0)
        await e.join(ctrl)  # registers while the re-home loads b's experts onto a and c
        await lose
        reg = ctrl.registry
        exact = lambda s: s.held() == set(reg.assignment(reg.shards[s.shard_id].position))  # noqa: E731
        await _until(lambda: all(exact(s) for s in (a, c, e)), 5, "every shard holding exactly its assignment")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "c", "e"]
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abce", scenario)


def test_spares_ready_out_of_order_keep_distinct_positions(model):
    """Two replicas join as spares (scale out) and the second reports ready first: placing it must not leave the
    first on the position it was given, or both hold that position and draining the empty one re-homes the
    other's experts and leaves it an idle spare."""
    async def scenario(files, a, b, c, d):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        assert (await ctrl.register("c", c.address))["position"] == 2  # c is still starting
        await d.join(ctrl)  # d overtakes it: the placement grows onto d
        await ctrl.ready("c")
        positions = [s.position for s in ctrl.registry.shards.values()]
        assert len(set(positions)) == len(positions), positions
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "d", "c"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b, c, d))
        table = await ctrl.drain("c")  # scale-in picks c: d keeps its place and its experts
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "d"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b, d))
        assert _routed_to(table, "d")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abcd", scenario)


def test_a_shard_loading_its_plan_while_a_re_home_loads_onto_it_holds_its_assignment(model):
    """c registers and, before it applies its plan (as ExpertShard._register does: drop what the plan does not
    name, load the rest, report ready), a, the only live shard, dies and its re-home loads copies onto c (there is no
    live shard to take them). Applying the now stale plan dropped them again: the table routed them to c, which
    answered `missing`. Ready makes c hold its assignment."""
    async def scenario(files, a, c):
        ctrl = ControllerImpl(_args(model, num_shards=2))
        await a.join(ctrl)
        plan = await ctrl.register("c", c.address)
        a.server.stop(None)
        async with ctrl._lock:
            await ctrl._lose("a", "health check failed")
        reg = ctrl.registry
        assert set(reg.assignment(reg.shards["c"].position)) - set(plan["experts"])  # the re-home loaded onto c
        c.store.drop(c.held() - set(plan["experts"]))  # c applies its plan only now
        c.store.load(plan["experts"])
        await ctrl.ready("c")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["c"]
        assert c.held() == set(reg.assignment(reg.shards["c"].position))
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "ac", scenario)


def test_draining_the_last_live_shard_re_homes_onto_a_ready_spare(model):
    """b has been found dead (not re-homed yet) and c is a ready spare (the scale out waits for every position to
    have a live shard) when a drains: every position was gone, so the drain re-homed nothing and a left with the
    only copies while c stayed an idle spare (and the health rounds found nothing to re-home onto for good). The
    spare joins the placement and takes the experts first."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b)
        assert (await ctrl.register("c", c.address))["experts"] == []  # a spare
        b.server.stop(None)
        ctrl._mark_failed([ctrl.registry.shards["b"]], "health check failed")  # as the health round does first
        await ctrl.ready("c")
        assert [s.shard_id for s in ctrl.registry.spares()] == ["c"]
        table = await ctrl.drain("a")
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["c"]
        assert _routed_to(table, "c") <= c.held() and set(ctrl.registry.shards) == {"c"}
        ctrl.registry.placement.validate()

    _with_shards(model, "abc", scenario)
