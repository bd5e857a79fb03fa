"""The controller's load and health rounds without Ray: metrics, rebalance, the load tracker, scale decisions and
loop errors, over real in-process gRPC shards where a shard is needed."""

from __future__ import annotations

import asyncio
import time

import pytest

from elasticmoe.autoscaler.record import GcsRecord
from tests.controller_util import ControllerImpl, _args, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.tracker_util import SteppedTime


def test_a_failing_loop_is_logged_counted_and_keeps_running(model, monkeypatch, caplog):
    """README: the controller's loops "log and count errors instead of dying"."""
    import elasticmoe.autoscaler.controller as controller_module

    GcsRecord("default").clear()
    ctrl = ControllerImpl(_args(model))
    real_sleep = asyncio.sleep
    monkeypatch.setattr(controller_module.asyncio, "sleep", lambda s: real_sleep(0))
    runs = []

    async def _stats_once():
        runs.append(1)
        if len(runs) == 3:
            raise asyncio.CancelledError  # the test's way out: not an Exception, so not caught
        raise RuntimeError(f"failure {len(runs)}")

    async def scenario():
        with pytest.raises(asyncio.CancelledError):
            await ctrl._forever(_stats_once)
        return await ctrl.status()

    with caplog.at_level("ERROR", logger=controller_module.log.name):
        status = asyncio.run(scenario())
    assert len(runs) == 3  # two failures did not end the loop
    assert ctrl.loop_errors == 2 and status["loop_errors"] == 2 and status["event_counts"]["loop_error"] == 2
    assert status["metrics_flush_errors"] == ctrl.metrics.flush_errors == 0  # shown beside them (none failed)
    assert sum("controller loop _stats_once failed" in r.getMessage() for r in caplog.records) == 2


def test_copies_metric_counts_live_copies_only(model):
    """elasticmoe_expert_copies is the live copies of each expert: a lone shard that dies (nothing to re-home onto)
    leaves every expert with 0, not the placement's 1."""
    async def scenario(files, a):
        ctrl = ControllerImpl(_args(model, num_shards=1))
        await a.join(ctrl)
        await _until(lambda: ctrl.metrics.expert_copies and set(ctrl.metrics.expert_copies.values()) == {1}, 10,
                     "one copy of every expert exported")
        a.server.stop(None)
        await _until(lambda: ctrl.event_counts.get("unhealthy"), 10, "the shard marked unhealthy")
        await _until(lambda: set(ctrl.metrics.expert_copies.values()) == {0}, 5, "no live copy exported")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "a", scenario)


def test_shard_health_metric_is_whether_the_shard_answers(model):
    """elasticmoe_shard_healthy is 1 for a shard that answers, also one still loading its experts (a replica
    starting, or a spare on scale out), not only for those in the table; 0 once it stops answering."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await ctrl.register("b", b.address)  # still loading
        await c.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the rounds below are the only ones
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True, "b": True, "c": True}
        c.server.stop(None)
        async with ctrl._lock:
            ctrl._mark_failed([ctrl.registry.shards["c"]], "health check failed")  # before its re-home
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True, "b": True, "c": False}

    _with_shards(model, "abc", scenario)


def test_rebalance_waits_for_a_shard_that_never_registered(model):
    """With 2 copies of every expert the placement is complete before its third shard registers; a rebalance
    then must not plan copies onto that empty position (there is no one to load them: it raised KeyError every
    round) but wait, and work once the shard is there."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model, num_shards=3, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)
        assert (await ctrl.table())["complete"]
        await ctrl._stats_once()  # the baselines
        for s in (a, b):
            for layer in files.spec.moe.moe_layers:
                s.store.count(layer, {0: 5000, 1: 3000})  # two hot experts
        await ctrl._stats_once()
        version = ctrl.registry.version
        await ctrl.rebalance()
        assert ctrl.registry.version == version and not ctrl.event_counts.get("placement")
        await c.join(ctrl)
        await ctrl.rebalance()
        assert ctrl.event_counts.get("placement") == 1 and (await ctrl.table())["complete"]
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abc", scenario)


# ----- the load tracker: per-expert token rates from the shards' cumulative counters
def test_load_tracker_counts_only_tokens_served_since_a_shard_was_last_seen():
    """A shard first seen (a restarted controller) or back after a missed stats round adds only the tokens served
    since the tracker last read its counters: its lifetime total is not one interval's rate."""
    from elasticmoe.autoscaler.policy import LoadTracker

    tracker = LoadTracker(1, 2, half_life_s=1e-3)  # the EMA follows the last rate
    layers = {5: 0}
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_000}, 100.0)}, layers)  # served before this controller started
    assert tracker.ema.max() == 0.0 and tracker.utilization["a"] == 0.0
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_010}, 100.0)}, layers)
    assert 0 < tracker.ema[0, 0] <= 10 / 0.05
    time.sleep(0.05)
    tracker.update({}, layers)  # a's GetStats timed out this round
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_020}, 100.0)}, layers)
    assert tracker.ema[0, 0] <= 10 / 0.05  # 10 tokens since it was last read, not 1_000_020


def test_scale_out_is_not_compounded_while_new_shards_start():
    """The shard count follows the work the live shards report: while the replicas asked for are still starting
    (longer than the cool-down: loading a large model's experts), the same busy shards do not ask for more again."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0)
    decide.started()
    assert decide.desired(2, [1.0, 1.0]) == 4  # 2 shards' work at 0.5 each
    assert decide.desired(4, [1.0, 1.0]) == 4  # 2 more asked for, not live yet: still 4, not 8
    assert decide.desired(4, [0.6, 0.6, 0.6, 0.6]) == 5
    assert decide.desired(5, [0.1] * 5) == 4  # scale in one at a time


def test_scale_in_is_not_compounded_while_drained_shards_still_serve():
    """While the shards a scale-in let go still drain (still live), their low utilization must not take the count
    below what the work needs: 4 live shards at 0.15 (0.6 in all) need 2 at a 0.5 target, not 1."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0)
    decide.started()
    assert decide.desired(4, [0.15] * 4) == 3
    assert decide.desired(3, [0.15] * 4) == 2  # one is draining
    assert decide.desired(2, [0.15] * 4) == 2  # two are: one shard would run at 0.6
    assert decide.desired(2, [0.18, 0.18]) == 1  # gone: one shard runs at 0.36 (<= 3/4 of the target)


def test_scale_out_asks_for_the_shards_the_work_needs_not_one_more():
    """4 shards at 1.05 with a 0.6 target are 4.2 shards' work: 7 shards at 0.6, not 8 (4.2 / 0.6 is
    7.000000000000001 in floats, and its ceiling 8)."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.6, cooldown_s=0.0)
    assert decide.desired(4, [1.05] * 4) == 7
    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0)
    assert decide.desired(2, [0.9, 0.8]) == 4  # 1.7 / 0.5 = 3.4: still rounds up


def test_the_first_decision_is_not_held_by_the_cool_down():
    """A new decider has changed nothing yet: its first decision is not held back by a cool-down counted from the
    host's boot (time.monotonic() starts near 0 on a fresh machine)."""
    import time

    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=time.monotonic() + 3600)
    assert decide.desired(2, [1.0, 1.0]) == 4


def test_no_scale_in_before_the_cluster_is_up_and_warmed_up(monkeypatch):
    """Idle shards are no reason to scale in before the cluster ran the count it started with (`started`: every
    position of the placement live), nor for a cool-down after that (the warm-up); the floor stays min_shards."""
    from elasticmoe.autoscaler import policy

    clock = SteppedTime()
    monkeypatch.setattr(policy, "time", clock)
    decide = policy.ScaleDecider(min_shards=2, max_shards=16, target_utilization=0.5, cooldown_s=30.0)
    assert decide.desired(4, [0.0]) == 4  # 1 of 4 shards up, idle: no request yet
    clock.now += 100.0
    decide.started()
    clock.now += 29.9
    assert decide.desired(4, [0.0] * 4) == 4  # up, warming up
    clock.now += 0.2
    decide.started()  # again (every stats round says so): the warm-up is not restarted
    assert decide.desired(4, [0.0] * 4) == 3
    decide.cooldown_s = 0.0
    assert decide.desired(3, [0.0] * 3) == 2
    assert decide.desired(2, [0.0] * 2) == 2  # min_shards


def test_an_override_change_starts_the_cool_down():
    """An operator's override that moved the count is a change like any other: once cleared, the automatic
    decision waits out the cool-down instead of undoing it on the next round."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0, override=4)
    decide.started()  # up, no warm-up: only the cool-down of the operator's change holds it
    decide.cooldown_s = 3600
    assert decide.desired(2, [0.1, 0.1]) == 4  # the operator asks for 4
    decide.override = None
    assert decide.desired(4, [0.1] * 4) == 4  # idle, but within the cool-down of the operator's change
    decide.cooldown_s = 0.0
    assert decide.desired(4, [0.1] * 4) == 3


@pytest.mark.parametrize("cooldown_s, desired", [(0.0, 1), (None, 2)])
def test_the_cool_down_is_the_configs(model, cooldown_s, desired):  # noqa: F811
    """autoscaling.scale_cooldown_s is the controller's cool-down and warm-up: two idle shards, up, two stats
    rounds. With 0 the warm-up is over at once and the cluster scales in; left unset (30 s) it waits."""
    from tests.controller_util import _quiet

    extra = {} if cooldown_s is None else {"scale_cooldown_s": cooldown_s}
    auto = {"autoscaling": {"min_shards": 1, "max_shards": 4, **extra}}

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, **auto)
        assert ctrl.scale.cooldown_s == (30.0 if cooldown_s is None else cooldown_s)
        await ctrl._stats_once()  # staffed: the warm-up starts; the baselines
        await ctrl._stats_once()  # idle
        assert ctrl.desired == desired

    _with_shards(model, "ab", scenario)


def test_status_and_the_stats_round_ask_every_shard_at_once(model):
    """Shards that accept a connection but never answer (paused, a node gone half-way) cost status() and the stats
    round one GetStats timeout (2 s) together, not one each: asked one after another, 3 of them held `elasticmoe
    status` for over 6 s (and 15 its 30 s limit) and the stats round as long."""
    import socket

    holes = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # listening, never accepting: no answer

    async def scenario(files, a):
        ctrl = ControllerImpl(_args(model, num_shards=4))
        await a.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the calls below are the only ones
        for i, hole in enumerate(holes):
            await ctrl.register(f"hole{i}", f"127.0.0.1:{hole.getsockname()[1]}")
            ctrl.registry.shards[f"hole{i}"].ready = True  # as if loaded: the stats round asks the live ones
        t0 = time.monotonic()
        status = await ctrl.status()
        took = time.monotonic() - t0
        by_id = {s["id"]: s for s in status["shards"]}
        assert "tokens" in by_id["a"] and all(by_id[f"hole{i}"]["stats_error"] == "unreachable" for i in range(3))
        assert took < 4.5, f"status() took {took:.1f} s"
        assert len(ctrl.registry.live()) == 4
        for _ in range(2):  # the baseline read, then a measured one
            t0 = time.monotonic()
            await ctrl._stats_once()
            took = time.monotonic() - t0
            assert took < 4.5, f"the stats round took {took:.1f} s"
        assert set(ctrl.load.measured) == {"a"}

    try:
        _with_shards(model, "a", scenario)
    finally:
        for hole in holes:
            hole.close()
