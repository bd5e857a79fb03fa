"""The load tracker's first read of a shard: one that started after the tracker's first round (a scale out's, a
replacement's) is counted from its start (GetStats' uptime_s), so its experts keep their load through the round it
joins; any other shard first seen (met by a restarted controller, or back in the live set) only sets its baseline."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.autoscaler import policy
from tests.tracker_util import clock, counters  # noqa: F401 - clock: the fixture


def test_a_scale_out_shard_keeps_its_experts_load_through_its_first_round(clock):
    """1 s rounds, a steady load on shards a and b; c starts (its process, then its experts load: 35 s) and goes
    live mid-round 45, taking b's experts 1 and 3 (a make-before-break move: b serves them no more). c's first read
    only set a baseline: experts 1 and 3 counted 0 tokens/s that round, 13% off their EMA (half-life 5 s), and
    the next rebalance re-shared onto them. Counted from c's start (all its tokens are the round's), the EMA holds."""
    layers, rates = [3, 5], np.array([[400.0, 300.0, 200.0, 100.0], [250.0, 250.0, 250.0, 250.0]])  # [L, E] tokens/s
    on = {"a": np.array([1, 0, 1, 0]), "b": np.array([0, 1, 0, 1]), "c": np.zeros(4)}  # [E] share of each expert
    tracker = policy.LoadTracker(2, 4)
    served = {s: np.zeros((2, 4)) for s in on}
    c_started = None
    for r in range(60):
        if r == 10:
            c_started = clock.now  # c's process starts; its experts load until round 45
        for half in range(2):
            if (r, half) == (45, 1):  # c goes live in the middle of round 45
                on["b"], on["c"] = np.zeros(4), np.array([0, 1, 0, 1])
            clock.now += 0.5
            for s in on:
                served[s] += rates * on[s] * 0.5
        live = ["a", "b", "c"] if r >= 45 else ["a", "b"]
        stats = {s: (counters(served[s], layers), 0.0) for s in live}
        uptime = {s: clock.now - (900.0 if s != "c" else c_started) for s in live}
        tracker.update(stats, {l: i for i, l in enumerate(layers)}, unread=(), uptime=uptime)
        if r >= 40:
            np.testing.assert_allclose(tracker.ema, rates, rtol=0.01, err_msg=f"round {r}")


def test_a_shard_from_before_the_first_round_counts_from_its_baseline(clock):
    """A restarted controller's tracker meets shards that served for hours: at its first round, and also later (a
    shard not live at the first round, live again afterwards). Their totals so far are not one round's tokens."""
    tracker = policy.LoadTracker(1, 2, half_life_s=1e-3)  # the EMA follows the last rate
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 3_600_000}, 0.0)}, {0: 0}, uptime={"a": 36_000.0})
    assert tracker.ema[0, 0] == pytest.approx(0.0, abs=1e-6)
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 3_600_100}, 0.0), "b": ({(0, 1): 5_000_000}, 0.0)}, {0: 0},
                   uptime={"a": 36_001.0, "b": 50_000.0})
    assert tracker.ema[0, 0] == pytest.approx(100.0) and tracker.ema[0, 1] == pytest.approx(0.0, abs=1e-6)
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 3_600_200}, 0.0), "b": ({(0, 1): 5_000_100}, 0.0)}, {0: 0},
                   uptime={"a": 36_002.0, "b": 50_001.0})
    assert tracker.ema[0, 1] == pytest.approx(100.0)


def test_a_shard_back_in_the_live_set_counts_from_its_baseline(clock):
    """A shard read, then out of the live set for a while (found dead, then ready again) comes back with its totals
    since its start: not this round's tokens, though it started after the tracker's first round."""
    tracker = policy.LoadTracker(1, 2, half_life_s=1e-3)
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 0}, 0.0)}, {0: 0}, uptime={"a": 10.0})
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 100}, 0.0), "b": ({(0, 1): 100}, 0.0)}, {0: 0}, uptime={"a": 11.0, "b": 0.5})
    assert tracker.ema[0, 1] == pytest.approx(100.0)  # new: counted from its start
    for _ in range(3):  # b out of the live set: it served on meanwhile (a gateway's table, then none)
        clock.now += 1.0
        tracker.update({"a": ({(0, 0): 100}, 0.0)}, {0: 0}, uptime={"a": 12.0})
    clock.now += 1.0
    tracker.update({"a": ({(0, 0): 100}, 0.0), "b": ({(0, 1): 900}, 0.0)}, {0: 0}, uptime={"a": 13.0, "b": 4.5})
    assert tracker.ema[0, 1] == pytest.approx(0.0, abs=1e-6)
