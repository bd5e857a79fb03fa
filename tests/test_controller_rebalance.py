"""The controller's load decisions without Ray, over real in-process gRPC shards: what a rebalance publishes for
the load it measured, and the shard count it asks for."""

from __future__ import annotations

import asyncio

import numpy as np

from elasticmoe.autoscaler.registry import Change
from elasticmoe.placement import Placement
from tests.controller_util import _quiet, _routed_to, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _with_copy(cur: Placement, expert: int, dst: int) -> Placement:
    """`cur` with one more copy of `expert` (every layer) on position `dst`, its tokens split evenly."""
    holds, shares = cur.holds(), cur.shares()  # [L, E, N]
    holds[:, expert, dst] = True
    shares[:, expert] = holds[:, expert] / holds[:, expert].sum(1, keepdims=True)
    return Placement.from_arrays(shares, holds, cur.slots_per_shard)


def test_a_rebalance_publishes_new_shares_when_no_copy_needs_to_move(model):
    """Expert 0 has copies on a and b, its tokens split evenly; then a's other experts get busy. The best answer
    is to send expert 0's tokens to b (shares only, no weight moves): the planner finds it, but the rebalance
    published a change only when it added copies, so the gateways kept the stale 50/50 split and a ran at 1.5x b's
    load for good. A share change that lifts the balancedness is published too."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, autoscaling={"min_shards": 1, "max_shards": 2})
        cur = ctrl.registry.placement
        assert [p for p, _ in cur.replicas(0, 0)] == [0] and 0 not in [p for p, _ in cur.replicas(0, 4)]
        async with ctrl._lock:
            await ctrl._apply(Change(cur, _with_copy(cur, 0, 1), {0: 0, 1: 1}), "test copy")
        load = np.zeros_like(ctrl.load.ema)
        load[:, 0], load[:, 1:4] = 100.0, 30.0  # a: experts 0-3, b: experts 0 and 4-7
        ctrl.load.ema = load
        assert ctrl.registry.placement.balancedness(load).max() < 0.7
        version = ctrl.registry.version
        await ctrl.rebalance()
        assert ctrl.registry.version > version and ctrl.registry.placement.balancedness(load).min() > 0.98
        table = await ctrl.table()
        for experts in table["layers"].values():
            (_, on_a), (_, on_b) = experts[0]
            assert on_a < 0.1 < 0.9 < on_b
        assert a.held() | b.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(8)}
        await ctrl.rebalance()  # nothing better to publish: no new version
        assert ctrl.event_counts["placement"] == 2

    _with_shards(model, "ab", scenario)


def test_a_shard_whose_stats_were_not_read_does_not_count_as_idle(model, monkeypatch):
    """Two shards each busy 40% of the time against a 0.7 target: 2 shards are right (one would run at 0.8). A
    shard's first read (every shard's, in a controller's first round: also after a restart) only sets its baseline,
    and a GetStats that times out (a network blip, a GIL-starved shard) is no read, then a baseline again: each
    counted the shard as idle, and the controller asked for 1 shard. A round that did not measure every live shard
    decides nothing."""
    import time

    from elasticmoe.rpc import experts_pb2 as pb

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, autoscaling={"min_shards": 1, "max_shards": 4, "target_utilization": 0.7,
                                                      "scale_cooldown_s": 0})
        t0, unread = time.monotonic(), set()

        async def stats(address, timeout=2.0):  # each shard busy 40% of the wall time
            if address in unread:
                return None
            return pb.GetStatsResponse(busy_us=int(0.4 * (time.monotonic() - t0) * 1e6))

        monkeypatch.setattr(ctrl, "_stats", stats)
        for missed in (set(), set(), {b.address}, set(), set()):
            unread.clear()
            unread.update(missed)
            await asyncio.sleep(0.1)
            await ctrl._stats_once()
            assert ctrl.desired == 2, (missed, ctrl.load.utilization)

    _with_shards(model, "ab", scenario)


def test_a_shard_whose_stats_always_fail_does_not_stop_scaling(model, monkeypatch):
    """Two shards each busy 90% of the time against a 0.7 target: 3 shards are right. b answers its health checks
    but its GetStats always fails: as no round measured every live shard, no round decided anything, and the count
    stayed 2 for good (nor would it ever scale in). A shard unmeasured for a few rounds in a row
    (stats.UNMEASURED_ROUNDS, 3) counts as busy as the busiest measured one; the rounds before still decide nothing
    (a first read is no measure)."""
    import time

    from elasticmoe.rpc import experts_pb2 as pb

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, autoscaling={"min_shards": 1, "max_shards": 4, "target_utilization": 0.7,
                                                      "scale_cooldown_s": 0})
        t0 = time.monotonic()

        async def stats(address, timeout=2.0):  # a busy 90% of the wall time; b's reads fail
            if address == b.address:
                return None
            return pb.GetStatsResponse(busy_us=int(0.9 * (time.monotonic() - t0) * 1e6))

        monkeypatch.setattr(ctrl, "_stats", stats)
        for _ in range(2):
            await asyncio.sleep(0.1)
            await ctrl._stats_once()
            assert ctrl.desired == 2, ctrl.load.utilization
        for _ in range(4):
            await asyncio.sleep(0.1)
            await ctrl._stats_once()
        assert ctrl.desired == 3, ctrl.load.utilization

    _with_shards(model, "ab", scenario)


def test_an_idle_first_shard_is_not_scaled_in_while_the_others_still_start(model):
    """num_shards 2, min_shards 1: a is up, b still loads its experts (minutes for a large model). No request has
    come yet, so a measured idle and the controller asked Serve for 1 shard: the starting b (or a) was stopped
    before the cluster ever ran the count it was deployed with. No scale in before every position of the placement
    is live, nor within the cool-down after that (the warm-up; 0 here); scaling out is not held."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, autoscaling={"min_shards": 1, "max_shards": 2, "target_utilization": 0.7,
                                                   "scale_cooldown_s": 0})
        plan = await ctrl.register("b", b.address)  # b loads its plan
        for _ in range(4):
            await asyncio.sleep(0.05)
            await ctrl._stats_once()
            assert ctrl.desired == 2, ctrl.load.utilization
        b.store.load(plan["experts"])
        await ctrl.ready("b")
        for _ in range(3):  # b's baseline read, then both measured idle: now it may
            await asyncio.sleep(0.05)
            await ctrl._stats_once()
        assert ctrl.desired == 1, ctrl.load.utilization

    _with_shards(model, "ab", scenario)


def test_a_missed_stats_read_takes_nothing_off_the_shards_expert_load(model, monkeypatch):
    """a serves expert 0 and b expert 1 at the same steady rate; b's GetStats fails one round. The controller's
    stats round hands the tracker the live shards it could not read: b's expert keeps its load through the gap
    (it went to 0 tokens/s for that round and the next, and a rebalance then re-shared onto b)."""
    import time

    from elasticmoe.rpc import experts_pb2 as pb

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, autoscaling={"min_shards": 2, "max_shards": 2})
        ctrl.load.half_life_s = 0.2  # rounds 0.1 s apart: a missed read shows as it would at 1 s and 5 s
        layer, t0, unread = files.spec.moe.moe_layers[0], time.monotonic(), set()

        async def stats(address, timeout=2.0):  # 1e6 tokens per second each
            if address in unread:
                return None
            tokens = int(1e6 * (time.monotonic() - t0))
            return pb.GetStatsResponse(tokens=[pb.ExpertTokens(layer=layer, expert=int(address == b.address),
                                                               tokens=tokens)])

        monkeypatch.setattr(ctrl, "_stats", stats)
        for r in range(14):
            unread.clear()
            unread.update({b.address} if r == 10 else set())
            await asyncio.sleep(0.1)
            await ctrl._stats_once()
            if r >= 8:
                ema = ctrl.load.ema[0]
                assert abs(ema[1] / ema[0] - 1) < 0.05, (r, ema[:2])

    _with_shards(model, "ab", scenario)


def test_slots_widened_while_few_shards_were_live_go_back_once_more_are(model):
    """slots_per_shard 6, expert_copies 2, 3 shards; c is still loading when b dies. The re-home onto a alone needed
    8 slots (every expert on the one live shard) and gave c, a kept loading shard, copies up to that too; once c was
    ready the placement kept 8 slots per shard, and every rebalance planned with them: shards held more copies than
    the operator sized them for, for good (until a scale out). A rebalance plans with the configured slots again
    (or the fewest that fit every expert), dropping the extra copies."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, num_shards=3, expert_copies=2,
                            autoscaling={"min_shards": 1, "max_shards": 3, "slots_per_shard": 6})
        plan = await ctrl.register("c", c.address)
        c.store.load(plan["experts"])
        b.server.stop(None)
        async with ctrl._lock:
            await ctrl._lose("b", "health check failed")
        await ctrl.ready("c")
        assert ctrl.registry.complete()
        await ctrl.rebalance()
        p = ctrl.registry.placement
        assert p.num_shards == 2 and p.slots_per_shard == 6, p.slots_per_shard
        assert p.holds().sum(1).max() <= 6
        table = await ctrl.table()
        assert table["complete"] and all(_routed_to(table, s.shard_id) <= s.held() for s in (a, c))

    _with_shards(model, "abc", scenario)
