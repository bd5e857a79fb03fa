"""The controller's health decisions without Ray, over real in-process gRPC shards: what takes a shard out of the
table and what may put it back in."""

from __future__ import annotations

from tests.controller_util import ControllerImpl, _args, _quiet, _routed_to, _until, _with_shards
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
        ctrl = await _quiet(model, a, b)
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


def _restart_with_a_missing_expert_0(model, ctrl, a, fail_loads: int):
    """ctrl dies; a has lost expert 0 of every layer (its record's placement, e.g. a change committed but never
    saved, moved it off a) and its next `fail_loads` loads fail. A new controller recovers (no loops of its own)."""
    import asyncio

    for task in ctrl._tasks:
        task.cancel()
    a.store.drop({(l, 0) for l in ctrl.moe_layers})
    a.servicer.faults.fail_loads = fail_loads
    ctrl2 = ControllerImpl(_args(model))
    assert ctrl2.recovering
    ctrl2._lock = asyncio.Lock()  # started without its loops: the rounds below are the only ones
    return ctrl2


def test_a_shard_whose_reload_failed_in_recovery_is_reloaded_by_the_health_loop(model):
    """Recovery reloads what a shard lost; a failed reload left it unhealthy, and the health loop, which revives
    only a shard already holding its assignment, never loaded it again: the experts whose copy it holds had no live
    copy for good (an incomplete table). The health round loads what it lacks and puts it back."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        ctrl2 = _restart_with_a_missing_expert_0(model, ctrl, a, fail_loads=1)
        await ctrl2._recover()
        assert not ctrl2.registry.shards["a"].healthy and not (await ctrl2.table())["complete"]
        await ctrl2._health_once()
        table = await ctrl2.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b))

    _with_shards(model, "ab", scenario)


def test_a_shard_that_cannot_reload_its_assignment_is_re_homed(model):
    """As above, and the health round's load fails too: the shard's experts are re-homed onto the others (it
    leaves the placement) rather than staying without a live copy."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        ctrl2 = _restart_with_a_missing_expert_0(model, ctrl, a, fail_loads=2)
        await ctrl2._recover()
        await ctrl2._health_once()
        table = await ctrl2.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["b"]
        assert _routed_to(table, "b") <= b.held() and "a" not in ctrl2.registry.shards

    _with_shards(model, "ab", scenario)


def test_a_spare_whose_placement_failed_is_placed_by_the_health_loop(model):
    """Scale out: c is ready as a spare and its first load fails, so the placement does not grow onto it (rolled
    back). Only another shard's ready() or a controller restart tried again: c stayed an idle spare for good, while
    the desired shard count counted it. The health round places waiting spares."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b)
        c.servicer.faults.fail_loads = 1
        await c.join(ctrl)
        assert ctrl.event_counts.get("grow_failed") == 1 and [s.shard_id for s in ctrl.registry.spares()] == ["c"]
        await ctrl._health_once()
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "c"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b, c)) and _routed_to(table, "c")

    _with_shards(model, "abc", scenario)


def test_a_scale_out_waits_for_a_dead_shard_to_be_re_homed(model):
    """b has been found dead (its re-home not done yet) when spare c reports ready: growing the placement then
    planned copies onto b's position too, whose loads fail (on a paused shard they hold the controller's lock for
    LoadExperts' timeout), so the scale out failed. It now waits until every position has a live shard: the health
    round re-homes b's experts, then places c."""
    import numpy as np

    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b)
        load = np.ones_like(ctrl.load.ema)
        load[:, :4] = 100.0  # a's experts are hot: a plan of 3 shards puts copies of them on b and c
        ctrl.load.ema = load
        assert (await ctrl.register("c", c.address))["experts"] == []  # a spare
        b.server.stop(None)
        ctrl._mark_failed([ctrl.registry.shards["b"]], "health check failed")  # as the health round does first
        await ctrl.ready("c")
        assert not ctrl.event_counts.get("grow_failed") and not ctrl.event_counts.get("load_failed")
        await ctrl._health_once()
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "c"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, c)) and _routed_to(table, "c")
        assert not ctrl.event_counts.get("load_failed")

    _with_shards(model, "abc", scenario)


def test_a_re_home_while_a_shard_loads_keeps_a_live_copy_of_every_expert(model):
    """Two copies of every expert on 3 positions: a and b are live, c still loads its assignment (the table is
    complete without it). b dies. Re-homing counted c's position as able to serve: the plan over a and c kept the
    experts of b and c on c alone (a's slots being full), so until c was ready they had no live copy. The plan now
    gives every expert a copy on the live shards; c keeps its assignment (with more copies) and joins when ready."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, num_shards=3, expert_copies=2)
        plan = await ctrl.register("c", c.address)  # loading
        assert (await ctrl.table())["complete"]
        _health_fails_for(ctrl, {"b"})
        await ctrl._health_once()
        table = await ctrl.table()
        assert [x["id"] for x in table["shards"]] == ["a"] and table["complete"]
        assert _routed_to(table, "a") <= a.held()
        ctrl.registry.placement.validate()
        # c's load stays valid; it also takes the second copies a cannot hold (test_controller_copies.py)
        assert set(ctrl.registry.assignment(ctrl.registry.shards["c"].position)) >= set(plan["experts"])
        c.store.load(plan["experts"])
        await ctrl.ready("c")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "c"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, c)) and _routed_to(table, "c")

    _with_shards(model, "abc", scenario)


class _HeldClock:
    """The back-offs' clock (backoff.time), moved only by the test: five rounds on a loaded machine can take more
    than the 2 s the second retry waits, and a third would be due."""

    def __init__(self, now: float):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_a_spare_that_fails_every_load_is_retried_with_a_backoff(model, monkeypatch):
    """Every load onto spare c fails. The health round retried the scale out every second (each a load under the
    controller's lock, then its roll back), a grow_failed event each, which pushed every other event out of the
    status. The first retry is the next round, the ones after wait longer each time (2 s, 4 s, ... up to a minute);
    a scale out that works resets it."""
    import time

    from elasticmoe.autoscaler import backoff

    clock = _HeldClock(time.monotonic())
    monkeypatch.setattr(backoff, "time", clock)

    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b)
        c.servicer.faults.fail_loads = 100
        await c.join(ctrl)
        for _ in range(5):
            await ctrl._health_once()
        assert ctrl.event_counts["grow_failed"] == 2 and [s.shard_id for s in ctrl.registry.spares()] == ["c"]
        assert (await ctrl.table())["complete"] and c.held() == set()
        c.servicer.faults.fail_loads = 0
        clock.now += 2.1  # the second retry's wait is over
        await ctrl._health_once()
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "c"] and _routed_to(table, "c")

    _with_shards(model, "abc", scenario)


def test_a_spare_ready_as_the_restarted_controllers_first_call_is_placed_after_the_recovery(model):
    """c registered as a spare and was loading when the controller restarted; its ready() was the new controller's
    first call. It took the lock before the recovery it had just started and grew the placement onto shards whose
    holdings nobody had checked yet (rebalance and the health round wait for the recovery). The recovery's end
    places the spare instead."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b)
        assert (await ctrl.register("c", c.address))["experts"] == []  # a spare (in the record)
        again = ControllerImpl(_args(model))
        assert again.recovering
        try:
            await again.ready("c")
            await _until(lambda: not again.recovering and not again.registry.spares(), 10, "recovery, then c placed")
            kinds = [(e["event"], e.get("reason")) for e in again.events]
            assert kinds.index(("recovered", None)) < kinds.index(("placement", "scale out")), kinds
            table = again._table()
            assert table["complete"] and _routed_to(table, "c") and _routed_to(table, "c") <= c.held()
        finally:
            for task in again._tasks:
                task.cancel()

    _with_shards(model, "abc", scenario)


def test_a_shard_lost_while_loading_leaves_no_expert_without_a_copy(model):
    """b registered (position 1 of 2) and died before it was ready: Serve stopped it (a scale in picks a replica
    still loading as readily as any) or its node went. The controller forgot it and left position 1 empty, so the
    experts placed only there had no copy anywhere, and nothing re-homed them (no shard was left to lose, rebalance
    and scale out wait for every position to be staffed) until a new replica happened to register. They are now
    re-homed onto the live shards at once."""

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a)
        assert (await ctrl.register("b", b.address))["position"] == 1
        b.server.stop(None)  # it stops before its ready()
        await ctrl._health_once()
        table = await ctrl.table()
        assert "b" not in ctrl.registry.shards and [x["id"] for x in table["shards"]] == ["a"]
        assert table["complete"] and _routed_to(table, "a") <= a.held()
        assert ctrl.registry.placement.num_shards == 1 and ctrl.registry.staffed()

    _with_shards(model, "ab", scenario)


def test_a_shard_found_dead_stays_out_of_a_restarted_controllers_table(model):
    """The health check found b dead and re-homing its experts failed: b is out of the table, which is incomplete
    (new requests wait). The record kept no health, so a restarted controller's tables routed b's experts to b again
    and called them complete until its recovery had checked every shard. b stays out until a probe finds it
    answering (the health loop revives it)."""
    import asyncio

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        _health_fails_for(ctrl, {"b"})
        a.servicer.faults.fail_loads = 1  # re-homing b's experts onto a fails
        await ctrl._health_once()
        assert not ctrl.registry.shards["b"].healthy and not (await ctrl.table())["complete"]
        ctrl2 = ControllerImpl(_args(model))
        ctrl2._lock = asyncio.Lock()  # started without its loops: the rounds below are the only ones
        assert ctrl2.recovering
        table = await ctrl2.table()  # before its recovery
        assert [x["id"] for x in table["shards"]] == ["a"] and not table["complete"]
        await ctrl2._recover()
        await ctrl2._health_once()  # b answers this controller's probes: revived
        table = await ctrl2.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b))

    _with_shards(model, "ab", scenario)


def test_sole_copies_counts_the_live_copies_a_shard_is_the_only_one_of(model):
    """status's `sole_copies` (local_cluster.sole_holder picks a single-copy fault's victim by it: "experts that
    have no other copy"; the code's comment: "lost with this shard") counted the placement's copies, a dead shard's
    among them: with c found dead (out of the table, not re-homed yet) a's and b's experts whose other copy was on c
    have one live copy left, yet they counted 0. Now a live shard counts its experts with no other live copy, and a
    shard out of the table counts none (it holds no copy the table routes to)."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, c, num_shards=3, expert_copies=2)
        c.server.stop(None)
        await ctrl._probe_once()  # c out of the table; its re-home is the settle round's, not run here
        table = ctrl._table()
        assert [s["id"] for s in table["shards"]] == ["a", "b"]
        alone = {(int(l), e) for l, experts in table["layers"].items() for e, reps in enumerate(experts)
                 if len(reps) == 1}  # the experts with one live copy
        assert alone  # c held the second copy of some
        sole = {s["id"]: s["sole_copies"] for s in (await ctrl.status())["shards"]}
        assert sole == {"a": len(alone & _routed_to(table, "a")), "b": len(alone & _routed_to(table, "b")), "c": 0}
        assert sole["a"] + sole["b"] == len(alone)

    _with_shards(model, "abc", scenario)


def test_status_copies_counts_live_copies(model):
    """status's `copies` ([L, E], as the expert_copies metric, "Live copies of an expert", and sole_copies count
    them; the fault tests wait on it for every expert replicated again) counted the placement's copies, a dead
    shard's among them: with c found dead and not re-homed yet, every expert still read 2. Now it counts the copies
    the table routes to."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, c, num_shards=3, expert_copies=2)
        st = await ctrl.status()
        assert {n for row in st["copies"] for n in row} == {2}
        c.server.stop(None)
        await ctrl._probe_once()  # c out of the table; its re-home is the settle round's, not run here
        table = ctrl._table()
        layers = {int(l): experts for l, experts in table["layers"].items()}
        st = await ctrl.status()
        assert st["copies"] == [[len(reps) for reps in layers[l]] for l in st["moe_layers"]]
        assert 1 in {n for row in st["copies"] for n in row}  # c held the second copy of some

    _with_shards(model, "abc", scenario)
