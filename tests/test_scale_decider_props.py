"""The shard count under a steady load: the decider's hysteresis holds at every count (2 -> 1 included), so a load
that only jitters never scales out and back in (each flap starts a shard, loads its experts, then drains one)."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from elasticmoe.autoscaler import policy
from tests.tracker_util import SteppedTime

PROPS = settings(max_examples=int(os.environ.get("ELASTICMOE_PLACEMENT_EXAMPLES", "300")), deadline=None,
                 derandomize=True, suppress_health_check=list(HealthCheck))
JITTER = 0.1  # the work seen varies by up to this fraction around its mean


def _run(monkeypatch, lo: int, hi: int, target: float, work: list[float], start: int) -> list[int]:
    """The counts the decider asks for, one round per cool-down, the live shards following it; `work`: busy
    shards' worth per round."""
    clock = SteppedTime()
    monkeypatch.setattr(policy, "time", clock)
    d = policy.ScaleDecider(lo, hi, target, cooldown_s=30.0)
    d.started()
    counts = [max(lo, min(hi, start))]
    for w in work:
        clock.now += 31.0
        n = counts[-1]
        counts.append(d.desired(n, [w / n] * n))
    return counts


@PROPS
@given(data=st.data())
def test_a_jittering_load_never_scales_out_and_back_in(data, monkeypatch):
    """Work within +-10% of a steady mean, any target, bounds and starting count: the count moves one way only.
    Scaling in from 2 to 1 asked for work below half the target on 2 shards, i.e. below the target on the one
    left, where the next round at a hair above it scaled out again: a 1 <-> 2 flap every cool-down at a load near
    the target. A scale in now leaves the shards at most 3/4 of the target."""
    lo, span = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 8))
    target = data.draw(st.sampled_from([0.3, 0.5, 0.7, 0.9, 1.0]))
    near = data.draw(st.integers(1, 6)) * target  # the work of whole shards at the target: where counts change
    mean = data.draw(st.one_of(st.floats(0.0, 10.0), st.floats(0.8 * near, 1.2 * near)))
    jitter = data.draw(st.lists(st.floats(-JITTER, JITTER), min_size=30, max_size=30))
    counts = _run(monkeypatch, lo, lo + span, target, [mean * (1 + j) for j in jitter], data.draw(st.integers(1, 12)))
    note(f"counts {counts}")
    steps = [np.sign(b - a) for a, b in zip(counts, counts[1:]) if b != a]
    assert len(set(steps)) <= 1, counts


def test_one_shard_near_its_target_stays_one(monkeypatch):
    """The case the property found: target 0.7, one shard's work jittering around 0.7 (0.69 .. 0.71). It scales
    out when above the target (2 shards), and stays at 2 while 2 are needed within the jitter."""
    work = [0.71, 0.69, 0.71, 0.69, 0.70, 0.69, 0.71, 0.69]
    counts = _run(monkeypatch, 1, 4, 0.7, work, 1)
    assert counts == [1, 2, 2, 2, 2, 2, 2, 2, 2], counts


def test_scale_in_still_follows_a_falling_load(monkeypatch):
    """The hysteresis holds back no real drop: idle shards go one per cool-down down to min_shards, and 2 shards
    whose work would fill one to 3/4 of the target or less go to 1."""
    assert _run(monkeypatch, 1, 8, 0.7, [0.0] * 8, 6) == [6, 5, 4, 3, 2, 1, 1, 1, 1]
    assert _run(monkeypatch, 2, 8, 0.7, [0.0] * 3, 3) == [3, 2, 2, 2]
    assert _run(monkeypatch, 1, 8, 0.7, [0.52, 0.52], 2) == [2, 1, 1]
    assert _run(monkeypatch, 1, 8, 0.7, [0.53, 0.53], 2) == [2, 2, 2]
