"""A restarted controller resumes its scaling clocks from its record: the warm-up it had waited out and the cool-down
of its last change go on, not start over. The decider as a unit, then controllers without Ray over real in-process
gRPC shards."""

from __future__ import annotations

import asyncio
import math
import time

from elasticmoe.autoscaler.policy import ScaleDecider
from tests.controller_util import ControllerImpl, _args, _quiet, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def test_a_decider_resumes_another_ones_clocks():
    first = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=0.0)
    fresh = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=3600)
    fresh.resume(first.state())  # nothing happened yet: nothing to resume
    assert fresh._last_change == -math.inf and fresh._scale_in_from == math.inf
    assert first.started() and not first.started()  # the warm-up starts once
    assert first.desired(4, [0.0] * 4) == 3  # warmed up (no cool-down): a change
    later = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=3600)
    later.resume(first.state())
    assert abs(later._scale_in_from - first._scale_in_from) < 0.01
    assert abs(later._last_change - first._last_change) < 0.01
    assert later.desired(3, [1.0] * 3) == 3  # busy, but within the cool-down of the change before the restart
    later.cooldown_s = 0.0
    assert later.desired(3, [1.0] * 3) == 6
    assert later.desired(6, [0.0] * 6) == 5  # the warm-up (over before the restart) is not waited again


def _auto(n: int, **kw) -> dict:
    return {"num_shards": n, "autoscaling": {"min_shards": 1, "max_shards": 6, **kw}}


async def _restarted(model, n: int):
    ctrl = ControllerImpl(_args(model, **_auto(n)))
    assert ctrl.recovering
    ctrl._lock = asyncio.Lock()  # started without its loops: the rounds below are the only ones
    await ctrl._recover()
    return ctrl


def test_a_restarted_controller_scales_in_without_waiting_a_warm_up_again(model):  # noqa: F811
    """The cluster had been up past its warm-up; the controller restarted. Its decider started over: no scale in
    before a new warm-up (30 s after its recovery), however idle the shards were. It resumes the record's."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, **_auto(2, scale_cooldown_s=0))  # its warm-up ends at once
        await ctrl._stats_once()  # staffed: the warm-up starts (saved)
        again = await _restarted(model, 2)  # redeployed with the default cool-down: the record resumes all the same
        assert again.scale.cooldown_s == 30.0
        await again._stats_once()  # the baselines
        await again._stats_once()  # idle
        assert again.desired == 1

    _with_shards(model, "ab", scenario)


def test_a_restarted_controller_keeps_the_cool_down_of_the_change_before(model):  # noqa: F811
    """The controller scaled in (3 -> 2) and restarted a moment later: its decider forgot the change, so the next
    busy round scaled out at once, inside the cool-down the change had started. It waits it out now."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, c, **_auto(3, scale_cooldown_s=0))
        await ctrl._stats_once()
        await ctrl._stats_once()
        assert ctrl.desired == 2  # idle: one fewer (the change is saved)
        again = await _restarted(model, 3)
        assert again.desired == 2
        await again._stats_once()  # the baselines
        t0 = time.monotonic()
        for s in (a, b, c):
            s.store.served.busy_s += 5.0  # as 5 s of expert compute would: every shard busy
        await again._stats_once()
        assert again.load.utilization["a"] > 1.0 and time.monotonic() - t0 < 25.0
        assert again.desired == 2  # within the cool-down of the scale in

    _with_shards(model, "abc", scenario)
