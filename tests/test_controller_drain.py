"""A drain (scale-in) whose re-home loads fail: tried again, elsewhere where it can, within the stopping replica's
graceful shutdown, and reported done only when every expert of the drained shard has a live copy elsewhere; over
real in-process shards with a gateway polling the table (tests/test_controller_sequences.py's)."""

from __future__ import annotations

import asyncio

import pytest

from elasticmoe.autoscaler import replace
from elasticmoe.autoscaler.record import GcsRecord
from tests.controller_util import _routed_to, _until
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.test_controller_sequences import _Run


def _with_gateway(model: str, n: int, scenario, copies: int = 1, loading: int = 0) -> None:
    """`scenario(run, *shards)` over a controller of `n` joined shards (a, b, ...; `copies` of each expert, its
    loops cancelled) with gateway "g" polling throughout; no table it runs may route to a copy not held. The last
    `loading` of them only register and load their plan (not ready: in run.starting)."""
    GcsRecord("default").clear()
    run = _Run(model, 0)
    run.n0, run.copies = n, copies

    async def go():
        run.ctrl = run.new_controller()
        shards = [run.shard() for _ in range(n)]
        stop = asyncio.Event()
        gateway = None
        try:
            for s in shards[:n - loading]:
                await s.join(run.ctrl)
            for s in shards[n - loading:]:
                s.store.load((await run.ctrl.register(s.shard_id, s.address))["experts"])
                run.starting.append(s)
            run.quiet()
            run.table = await run.ctrl.table(-1, "g")
            gateway = asyncio.ensure_future(run.gateway(stop))
            await scenario(run, *shards)
        finally:
            stop.set()
            if gateway is not None:
                await gateway
            for task in list(run.ctrl._tasks):
                task.cancel()
            for s in shards:
                s.server.stop(None)
        assert not run.problems, run.problems[:5]

    asyncio.run(go())


async def _drain_and_stop(run: _Run, shard) -> tuple[dict, set[tuple[int, int]]]:
    """Drain `shard`, then stop it as ExpertShard.__del__ does once drain() returns; (the answer, what it held)."""
    mine = set(run.ctrl.registry.assignment(run.ctrl.registry.shards[shard.shard_id].position))
    assert mine
    answer = await run.ctrl.drain(shard.shard_id)
    shard.server.stop(None)
    run.dead.add(shard.shard_id)
    await asyncio.sleep(0.1)  # the gateway's next poll
    return answer, mine


def _served_elsewhere(run: _Run, gone: str) -> set[tuple[int, int]]:
    """(model layer, expert) pairs the gateway's table routes to a shard other than `gone` that holds them."""
    return {x for s in run.table["shards"] if s["id"] != gone
            for x in _routed_to(run.table, s["id"]) & run.shards[s["id"]].held()}


def test_a_drain_whose_first_target_fails_a_load_re_homes_onto_another(model):
    """a's LoadExperts fails once. The drain of c rolled back, returned as if done, and c stopped with the only
    copies of its experts still in the table (gateways waited up to failover_s until the health round re-homed
    them). Now it tries again with a kept out of the targets: c's experts all load onto b first."""
    async def scenario(run, a, b, c):
        a.servicer.faults.fail_loads = 1
        answer, mine = await _drain_and_stop(run, c)
        assert mine <= _served_elsewhere(run, "c")  # no gap: every expert c held is served by a or b
        assert "c" not in [s["id"] for s in run.table["shards"]]
        assert run.ctrl.event_counts.get("rehome_failed") == 1 and a.servicer.faults.fail_loads == 0  # a's try
        assert answer["drained"] and "drain_incomplete" not in run.ctrl.event_counts
        assert mine <= b.held()  # the retry's target

    _with_gateway(model, 3, scenario)


def test_a_drain_retry_keeps_expert_copies(model):
    """2 copies of each expert on a, b, c: with a kept out, b alone would take one copy of every expert (all 8
    slots), and the experts a does not hold would be left with one copy where the slots allow two. The retry
    loads onto a again instead (the sequence test's seed 1 found it: "fewer than expert_copies")."""
    from elasticmoe.autoscaler.replace import _keeps_copies

    async def scenario(run, a, b, c):
        a_had = a.held()
        a.servicer.faults.fail_loads = 1
        answer, mine = await _drain_and_stop(run, c)
        assert mine <= _served_elsewhere(run, "c") and answer["drained"]
        assert run.ctrl.event_counts.get("rehome_failed") == 1
        assert a.held() - a_had and _keeps_copies(run.ctrl.registry.placement, 2)

    _with_gateway(model, 3, scenario, copies=2)


def test_a_drain_retries_its_only_target(model):
    """With no other shard to load onto, the try after a failed load goes to the same one."""
    async def scenario(run, a, b):
        a.servicer.faults.fail_loads = 1
        answer, mine = await _drain_and_stop(run, b)
        assert mine <= _served_elsewhere(run, "b") and answer["drained"]
        assert run.ctrl.event_counts.get("rehome_failed") == 1

    _with_gateway(model, 2, scenario)


def test_a_drain_that_cannot_re_home_says_so_and_leaves_it_to_the_health_round(model, caplog):
    """Every load fails on every try: the drain answers drained False (counted, logged), the shard stays in the
    table with its experts; once it has stopped, the health round re-homes them."""
    async def scenario(run, a, b, c):
        a.servicer.faults.fail_loads = b.servicer.faults.fail_loads = 100
        answer, mine = await _drain_and_stop(run, c)
        assert not answer["drained"] and "c" in [s["id"] for s in answer["shards"]]
        assert run.ctrl.event_counts.get("rehome_failed") == replace.DRAIN_ATTEMPTS
        assert run.ctrl.events[-1]["event"] == "drain_incomplete" and run.ctrl.events[-1]["shard"] == "c"
        assert "drain of c: its experts have no live copy elsewhere" in caplog.text
        a.servicer.faults.fail_loads = b.servicer.faults.fail_loads = 0
        await run.ctrl._health_once()  # c is found dead and re-homed, as before
        await asyncio.sleep(0.1)
        assert mine <= _served_elsewhere(run, "c") and run.table["complete"]

    _with_gateway(model, 3, scenario)


def test_no_drain_retry_starts_after_drain_rehome_s(model, monkeypatch):
    """The tries stay within the stopping replica's graceful shutdown: none starts after DRAIN_REHOME_S."""
    monkeypatch.setattr(replace, "DRAIN_REHOME_S", 0.0)

    async def scenario(run, a, b, c):
        a.servicer.faults.fail_loads = 1
        answer = await run.ctrl.drain("c")
        assert not answer["drained"] and run.ctrl.event_counts.get("rehome_failed") == 1
        assert run.ctrl.events[-1]["attempts"] == 1

    _with_gateway(model, 3, scenario)


def test_the_drain_fits_the_shards_graceful_shutdown():
    """Serve ends a stopping shard replica SHARD_SHUTDOWN_S after it asked it to stop (the shard deployment's
    graceful_shutdown_timeout_s): the replica probes the controller, the controller drains within DRAIN_S (the
    re-home by DRAIN_REHOME_S, its lock wait and load deadlines included, past it only a roll back's stats call and
    drops; then the gateways' acks, which get a long poll's time at least), and the replica stops its server."""
    from elasticmoe.app import build_app
    from elasticmoe.autoscaler.controller import TABLE_WAIT_MAX_S
    from elasticmoe.autoscaler.moves import ROLLBACK_DROP_S
    from elasticmoe.config import SHARD_SHUTDOWN_S
    from elasticmoe.experts.deployment import CONTROLLER_PROBE_S, STOP_GRACE_S

    shards = build_app({"model": "tiny:mixtral"})._bound_deployment.init_args[2]._bound_deployment
    assert shards.name == "ExpertShard"
    assert shards._deployment_config.graceful_shutdown_timeout_s == SHARD_SHUTDOWN_S
    stop_s = STOP_GRACE_S + 3.0  # __del__ waits this long for its server's stop
    assert CONTROLLER_PROBE_S + replace.DRAIN_S + stop_s <= SHARD_SHUTDOWN_S
    stats_s = 2.0  # Mover._load_many's GetStats before the loads
    assert replace.DRAIN_REHOME_S + stats_s + ROLLBACK_DROP_S + 2 * TABLE_WAIT_MAX_S <= replace.DRAIN_S


@pytest.mark.parametrize("fails", [1, 100])
def test_a_stopping_replica_logs_a_drain_left_incomplete(model, fails, caplog):
    """ExpertShard.__del__ stops either way (the health round takes over); a drain left incomplete is logged."""
    from tests.test_controller_restart import _Handle, _stop, _stopping_replica

    async def scenario(run, a, b):
        a.servicer.faults.fail_loads = fails  # once: the retry re-homes b's experts; always: it cannot
        await _stop(_stopping_replica(b, _Handle(run.ctrl)))
        run.dead.add("b")
        assert ("b" in run.ctrl.registry.shards) == (fails > 1)
        assert ("left experts with no live copy elsewhere" in caplog.text) == (fails > 1)

    _with_gateway(model, 2, scenario)


HANG_S = 8.0  # a LoadExperts that hangs (held on the shard): far past the drain's window in these tests
WINDOW_S = 1.0  # the drain's re-home bound in these tests (replace.DRAIN_REHOME_S)


def test_a_drain_whose_load_hangs_ends_within_its_window(model, monkeypatch):
    """a's and b's LoadExperts hang (a slow store): the drain's try waited for the loads' 300 s gRPC deadline, past
    the stopping replica's graceful shutdown (SHARD_SHUTDOWN_S), after which Serve kills it mid-drain. The re-home's
    deadline now cuts the loads' (and the roll back's drops'): the drain answers incomplete within its window, c
    stays in the table with its experts, and once it has stopped the health round re-homes them."""
    import time

    from elasticmoe.autoscaler.moves import ROLLBACK_DROP_S

    monkeypatch.setattr(replace, "DRAIN_REHOME_S", WINDOW_S)

    async def scenario(run, a, b, c):
        a.servicer.faults.load_delay_s = b.servicer.faults.load_delay_s = HANG_S
        began = time.monotonic()
        answer, mine = await _drain_and_stop(run, c)
        took = time.monotonic() - began - 0.1  # _drain_and_stop's wait for the gateway's poll
        assert took < WINDOW_S + ROLLBACK_DROP_S + 1.0, f"the drain took {took:.1f} s"
        assert not answer["drained"] and "c" in [s["id"] for s in answer["shards"]]
        assert run.ctrl.events[-1]["event"] == "drain_incomplete" and run.ctrl.event_counts.get("rehome_failed")
        a.servicer.faults.load_delay_s = b.servicer.faults.load_delay_s = 0.0
        await asyncio.sleep(HANG_S - took)  # the hung loads end (their callers gone, they load nothing)
        await run.ctrl._health_once()  # c is found dead and re-homed
        await asyncio.sleep(0.1)
        assert mine <= _served_elsewhere(run, "c") and run.table["complete"]

    _with_gateway(model, 3, scenario)


def test_a_drain_waiting_for_a_long_change_ends_within_its_window(model, monkeypatch):
    """A scale out onto d loads for HANG_S under the controller's lock when c drains: the drain waited for the lock
    with no limit (then for its own tries). It now gives up within its window and answers incomplete; c stays in
    the table, the scale out goes on."""
    import time

    monkeypatch.setattr(replace, "DRAIN_REHOME_S", WINDOW_S)

    async def scenario(run, a, b, c):
        d = run.shard()
        try:
            d.servicer.faults.load_delay_s = HANG_S
            grow = asyncio.get_running_loop().create_task(d.join(run.ctrl))  # ready(d): the scale out holds the lock
            await _until(lambda: run.ctrl._lock.locked() and "d" in run.ctrl.registry.shards, 5, "the scale out")
            began = time.monotonic()
            answer = await run.ctrl.drain("c")
            took = time.monotonic() - began
            assert took < WINDOW_S + 1.0, f"the drain took {took:.1f} s"
            assert not answer["drained"] and "c" in [s["id"] for s in answer["shards"]]
            assert run.ctrl.events[-1]["event"] == "drain_incomplete" and not grow.done()
            await grow
            assert "c" in run.ctrl.registry.shards and run.ctrl.registry.complete()
        finally:
            d.server.stop(None)

    _with_gateway(model, 3, scenario)
