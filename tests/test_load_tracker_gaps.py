"""The load tracker across a shard's missed GetStats: a live shard whose read failed keeps its baseline and its last
rate, so its experts' load does not dip (a dip the next rebalance re-shares to: the other shards' tokens pile onto
the shard that was not read)."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.autoscaler import policy
from elasticmoe.placement import Placement, plan
from tests.tracker_util import clock, counters  # noqa: F401 - clock: the fixture


def test_a_missed_read_leaves_the_shards_expert_load_as_it_was(clock):
    """Two shards, 1 s stats rounds, each serving its experts at a steady rate; b's GetStats fails one round (its
    2 s timeout: a GIL-starved or busy shard). b's experts went to 0 tokens/s that round and the next (its read then
    only set a baseline again): 24% off in the EMA (half-life 5 s), 10 s and more to recover. Now b is counted at
    its last rate while unread, and its next read covers the whole time since it was last read."""
    layers, rates = [3, 5], np.array([[400.0, 300.0, 200.0, 100.0], [250.0, 250.0, 250.0, 250.0]])  # [L, E] tokens/s
    on_a = np.array([True, False, True, False])  # [E] a holds experts 0 and 2, b 1 and 3 (every layer)
    tracker = policy.LoadTracker(2, 4)
    served = {"a": np.zeros((2, 4)), "b": np.zeros((2, 4))}
    for r in range(70):
        clock.now += 1.0
        served["a"] += rates * on_a
        served["b"] += rates * ~on_a
        missed = r == 50
        stats = {s: (counters(n, layers), 0.0) for s, n in served.items() if not (missed and s == "b")}
        tracker.update(stats, {l: i for i, l in enumerate(layers)}, unread={"b"} if missed else set())
        if r >= 45:
            np.testing.assert_allclose(tracker.ema, rates, rtol=0.01, err_msg=f"round {r}")
    assert tracker.measured == {"a", "b"}


def test_a_rebalance_after_a_missed_read_keeps_the_shares(clock):
    """The operator's view: a steady load, a balanced placement; one missed read of one shard just before a
    rebalance. The shares re-planned from the tracker's load stay those of the steady load (true balancedness as
    before); with the dip, the rebalance routed the hot experts' tokens onto the shard that was not read."""
    rng = np.random.default_rng(4)
    layers, experts, shards = [0, 1], 16, 4
    base = 1.0 / np.arange(1, experts + 1) ** 1.2
    rates = np.stack([rng.permutation(base) for _ in layers]) * 5000.0  # [L, E] tokens/s
    p = plan(rates, shards, 5)
    assert (p.balancedness(rates) > 0.99).all()
    tracker = policy.LoadTracker(len(layers), experts)
    served = np.zeros((shards, len(layers), experts))  # [N, L, E]
    split = p.shares().transpose(2, 0, 1)  # [N, L, E]
    for r in range(40):
        clock.now += 1.0
        served += rates[None] * split
        missed = r == 38
        stats = {f"s{s}": (counters(served[s], layers), 0.0) for s in range(shards) if not (missed and s == 0)}
        tracker.update(stats, {l: i for i, l in enumerate(layers)}, unread={"s0"} if missed else set())
    q = plan(tracker.planning_load(), shards, 5, current=p, max_moves=8)
    assert (q.balancedness(rates) > 0.98).all(), q.balancedness(rates)


def test_a_shard_gone_from_the_live_set_is_forgotten(clock):
    """A shard neither read nor named unread (drained, or dead) adds nothing: its experts' tokens now show up on
    the shards that took them over, and counting its last rate too would count them twice."""
    tracker = policy.LoadTracker(1, 2, half_life_s=1e-3)  # the EMA follows the last rate
    a, b = 0, 0
    for r in range(6):
        clock.now += 1.0
        a, b = a + 100, b + 100
        stats = {"a": ({(0, 0): a}, 0.0), "b": ({(0, 1): b}, 0.0)} if r < 4 else {"a": ({(0, 0): a, (0, 1): 0}, 0.0)}
        tracker.update(stats, {0: 0}, unread=set())
    assert tracker.ema[0, 1] == pytest.approx(0.0, abs=1e-6) and "b" not in tracker.utilization
    assert tracker.ema[0, 0] == pytest.approx(100.0)
