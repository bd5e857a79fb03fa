"""The controller's bookkeeping over real in-process gRPC shards: finished tasks and removed shards are forgotten."""

from __future__ import annotations

import asyncio

import pytest

from elasticmoe.autoscaler import moves
from elasticmoe.autoscaler.registry import Change
from elasticmoe.placement import Placement
from tests.controller_util import (E, ControllerImpl, _args, _gateway_behind_a_move, _moved, _quiet, _routed_to, _until,
                                   _with_shards)
from tests.controller_util import model  # noqa: F401 - a fixture


async def _drop_one_copy_each(ctrl) -> None:
    """Commit a placement with one copy of every expert where two are held: old copies are dropped by a task."""
    cur = ctrl.registry.placement
    one = Placement.even(cur.num_layers, E, cur.num_shards, cur.slots_per_shard, 1)
    async with ctrl._lock:
        await ctrl._apply(Change(cur, one, {p: p for p in range(cur.num_shards)}), "test")


def test_finished_drop_tasks_are_forgotten(model):
    """A long-lived controller makes a drop task per placement change: once it ended it is not kept (a leak)."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)
        loops = list(ctrl._tasks)
        for task in loops:
            task.cancel()
        await asyncio.wait(loops)
        await _until(lambda: not ctrl._tasks, 5, "the cancelled loops forgotten")
        await _drop_one_copy_each(ctrl)
        assert len(ctrl._tasks) == 1
        await _until(lambda: not ctrl._tasks, 10, "the finished drop task forgotten")
        assert len(a.held()) + len(b.held()) == len(files.spec.moe.moe_layers) * E  # the drops were made

    _with_shards(model, "ab", scenario)


def test_a_failed_drop_task_is_logged_and_counted(model, monkeypatch, caplog):
    """An exception ending a drop task is retrieved when it ends: logged, counted as a loop error, an event."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)

        async def broken(drops):
            raise RuntimeError("drop exploded")

        monkeypatch.setattr(ctrl, "_drop_now", broken)
        errors = ctrl.loop_errors
        await _drop_one_copy_each(ctrl)
        await _until(lambda: ctrl.loop_errors == errors + 1, 10, "the failed drop task counted")
        assert ctrl.event_counts.get("task_error") == 1
        for task in list(ctrl._tasks):
            task.cancel()

    with caplog.at_level("ERROR", logger=moves.log.name):
        _with_shards(model, "ab", scenario)
    failed = [r for r in caplog.records if "_drop_after_acks" in r.getMessage()]
    assert len(failed) == 1 and "drop exploded" in str(failed[0].exc_info[1])


def test_a_drained_shard_leaves_the_health_metric(model):
    """elasticmoe_shard_healthy names the registered shards only: a drained (or re-homed) shard is no ghost."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True, "b": True}
        await ctrl.drain("b")
        assert set(ctrl.registry.shards) == {"a"}
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True}

    _with_shards(model, "ab", scenario)


def test_a_failed_loads_rollback_keeps_copies_held_before_it(model):
    """A move took expert 0 off a (its copies there are dropped once gateway g runs the new table). The next change
    puts expert 0 back on a and expert 1 on b, whose load fails: the rollback drops what the load added (expert 1
    on b), not the copies a held already, which g still routes to a."""
    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        zero, one = ({(l, e) for l in files.spec.moe.moe_layers} for e in (0, 1))
        assert zero <= a.held() and zero <= b.held() and not one & b.held()
        cur = ctrl.registry.placement
        back = _moved(_moved(cur, 1, 0, 0), 0, 1, 1)
        b.servicer.faults.fail_loads = 1
        async with ctrl._lock:
            with pytest.raises(moves.LoadFailed):
                await ctrl._apply(Change(cur, back, {0: 0, 1: 1}), "test move back")
        assert _routed_to(old, "a") <= a.held()  # what g still routes to a is there
        assert zero <= b.held() and not one & b.held()  # b: its assignment, without the failed load's copies
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "ab", scenario)


def test_the_channels_of_shards_that_left_are_let_go(model):
    """Every shard address the controller called kept its gRPC channel for good: with scale out and in over new
    addresses (a new pod, a new port) the channels grew without bound. Those of shards no longer registered go."""
    async def scenario(files, a, b, *churn):
        ctrl = await _quiet(model, a, b)
        for s in churn:  # each joins (the placement grows onto it), then drains (scale in) and stops
            await s.join(ctrl)
            await ctrl.drain(s.shard_id)
            s.server.stop(None)
        await ctrl._health_once()  # calls every registered shard
        assert set(ctrl._stubs) <= {a.address, b.address, churn[-1].address}
        assert (await ctrl.table())["complete"]
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abcdef", scenario)


def test_gateways_gone_quiet_are_forgotten(model, monkeypatch):
    """Every gateway id that ever polled kept its ack entry: gateway replicas coming and going (their autoscaling)
    grew the controller's acks without bound. One silent for GATEWAY_TTL_S (no longer waited for) is forgotten."""
    monkeypatch.setattr(moves, "GATEWAY_TTL_S", 0.1)

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        for g in ("g1", "g2", "g3"):
            await ctrl.table(-1, g)
        await asyncio.sleep(0.2)
        await ctrl.table(-1, "g4")
        assert set(ctrl.acks) == {"g4"}

    _with_shards(model, "ab", scenario)


def test_drops_ask_every_shard_at_once(model, monkeypatch):
    """Drops (after the acks, or a failed load's rollback) run under the controller's lock and asked one shard after
    another: each shard that took the call but never answered (paused, its node going) held the lock, and with it
    every re-home, ready() and drain, for a deadline more. They are asked at once: one deadline in all."""
    import socket
    import time

    monkeypatch.setattr(moves, "DROP_TIMEOUT_S", 2.0)  # in turn: 6 s; at once: 2 s
    holes = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # listening, never accepting: no answer

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        pair = sorted(a.held())[0]
        drops = {f"127.0.0.1:{h.getsockname()[1]}": [pair] for h in holes}
        t0 = time.monotonic()
        async with ctrl._lock:
            await ctrl._drop_now({**drops, a.address: [pair]})
        took = time.monotonic() - t0
        assert took < 4.5, f"the drops took {took:.1f} s"  # margin for a busy CI machine
        assert pair not in a.held()

    try:
        _with_shards(model, "ab", scenario)
    finally:
        for hole in holes:
            hole.close()


def test_a_restarted_controller_checks_every_shard_at_once(model):
    """Recovery (holding the lock: no re-home, no growth meanwhile) asked the recorded shards one after another:
    each that took the call but never answered (its node gone with the old controller's) cost a GetStats timeout
    (2 s) more. They are asked at once."""
    import socket
    import time

    holes = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # listening, never accepting: no answer

    async def scenario(files, a):
        ctrl = await _quiet(model, a, num_shards=4)
        for i, hole in enumerate(holes):
            await ctrl.register(f"hole{i}", f"127.0.0.1:{hole.getsockname()[1]}")
            ctrl.registry.mark_ready(f"hole{i}")  # as if loaded and published
        ctrl._publish()
        ctrl2 = ControllerImpl(_args(model, num_shards=4))
        ctrl2._lock = asyncio.Lock()  # started without its loops: the recovery below is the only round
        assert ctrl2.recovering
        t0 = time.monotonic()
        await ctrl2._recover()
        took = time.monotonic() - t0
        assert took < 4.0, f"the recovery took {took:.1f} s"
        assert [s.healthy for s in ctrl2.registry.shards.values()] == [True, False, False, False]

    try:
        _with_shards(model, "a", scenario)
    finally:
        for hole in holes:
            hole.close()
