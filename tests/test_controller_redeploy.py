"""A controller restarted with changed args (a Serve redeploy starts a new controller replica with them): other
timing or policy args resume the recorded placement and run with the new values; other placement args start over.
Controllers without Ray over real in-process gRPC shards."""

from __future__ import annotations

import asyncio
import time

import pytest

from elasticmoe.autoscaler.policy import ScaleDecider
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.autoscaler.recovery import PLACEMENT_ARGS
from elasticmoe.config import AppArgs
from tests.controller_util import ControllerImpl, _args, _quiet, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture

# AppArgs fields a redeploy may change with the controller resuming its record (PLACEMENT_ARGS and autoscaling's
# slots_per_shard are the others)
NOT_PLACEMENT = {"num_gateways", "gateway_resources", "shard_resources", "limits", "autoscaling", "expert_metrics",
                 "served_model_name", "api_keys", "api_keys_file", "direct_grpc"}


def test_every_arg_is_placement_or_not():
    """A new AppArgs field has to be put on one side: resumed over or starting the controller over."""
    assert set(PLACEMENT_ARGS) | NOT_PLACEMENT == set(AppArgs.model_fields)
    assert not set(PLACEMENT_ARGS) & NOT_PLACEMENT


def _auto(**kw) -> dict:
    return {"num_shards": 3, "autoscaling": {"min_shards": 1, "max_shards": 6, **kw}}


async def _restarted(model, **args):
    ctrl = ControllerImpl(_args(model, **args))
    assert ctrl.recovering
    ctrl._lock = asyncio.Lock()  # started without its loops: the rounds below are the only ones
    await ctrl._recover()
    return ctrl


def test_a_redeploy_with_other_timing_args_resumes_and_runs_with_them(model):  # noqa: F811
    """The controller scaled in (3 -> 2) with no cool-down; an operator redeploys with a 1 h cool-down and other
    limits, deadline, interval and metrics. The new controller used to throw the record away (its args differed):
    a fresh placement and every shard loading again. It resumes: same placement and version, the shards' weights
    untouched, and the new cool-down holds back a scale out that the old one (0) would have made."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, c, **_auto(scale_cooldown_s=0))
        await ctrl._stats_once()
        await ctrl._stats_once()
        assert ctrl.desired == 2  # idle: one fewer (saved)
        layers = files.spec.moe.moe_layers
        weights = {(s.shard_id, l): s.store.snapshot(l) for s in (a, b, c) for l in layers}
        placement = ctrl.registry.placement.to_dict()
        again = await _restarted(model, **_auto(scale_cooldown_s=3600, start_deadline_s=60, rebalance_interval_s=2,
                                                max_moves=2, target_utilization=0.5), expert_metrics="per_layer",
                                 limits={"max_queue": 8})
        assert again.registry.placement.to_dict() == placement and set(again.registry.shards) == {"a", "b", "c"}
        assert all(s.store.snapshot(l) is weights[s.shard_id, l] for s in (a, b, c) for l in layers)  # no reload
        assert again.desired == 2 and again.scale.cooldown_s == 3600 and again.args.autoscaling.start_deadline_s == 60
        await again._stats_once()  # the baselines
        for s in (a, b, c):
            s.store.served.busy_s += 5.0  # every shard busy (5 s of expert compute)
        await again._stats_once()
        assert again.load.utilization["a"] > 1.0
        assert again.desired == 2  # within the new cool-down of the scale in

    _with_shards(model, "abc", scenario)


def test_a_redeploy_with_a_shorter_cool_down_shortens_a_running_warm_up(model):  # noqa: F811
    """The warm-up (no scale in before the cool-down has passed since every shard was up) was running with 600 s; the
    redeploy sets 0: the resumed warm-up ends at its start + 0, and the idle shards scale in."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, **_auto(scale_cooldown_s=600) | {"num_shards": 2})
        await ctrl._stats_once()  # staffed: the warm-up starts (saved)
        assert ctrl.scale._scale_in_from > time.monotonic() + 500
        again = await _restarted(model, **_auto(scale_cooldown_s=0) | {"num_shards": 2})
        assert again.scale._scale_in_from <= time.monotonic()
        await again._stats_once()  # the baselines
        await again._stats_once()  # idle
        assert again.desired == 1

    _with_shards(model, "ab", scenario)


def test_a_redeploy_with_narrower_bounds_resumes_within_them(model):  # noqa: F811
    """The operator's pin (5) is above the redeployed max_shards (4): the resumed count is 4, not 5."""
    GcsRecord("default").clear()

    async def run():
        assert await ControllerImpl(_args(model, **_auto())).set_target_shards(5) == 5
        again = ControllerImpl(_args(model, num_shards=3, autoscaling={"min_shards": 1, "max_shards": 4}))
        assert again.recovering and again.desired == 4 and again.scale.desired(again.desired, []) == 4

    asyncio.run(run())
    GcsRecord("default").clear()


@pytest.mark.parametrize("change", [
    {"dtype": "float16"},
    {"expert_copies": 2},
    {"num_shards": 2},
    {"autoscaling": {"min_shards": 1, "max_shards": 6, "slots_per_shard": 7}},
    {"autoscaling": None},
    {"insecure_internal": True},
])
def test_a_redeploy_with_other_placement_args_starts_over(model, change, caplog):  # noqa: F811
    """The record's placement is of another dtype, layout, slots or transport: the new controller starts over (an
    even placement of its own, no shard known, versions above the recorded one)."""
    async def scenario(files, a, b, c):
        args = _auto()
        ctrl = await _quiet(model, a, b, c, **args)
        version = ctrl.registry.version
        fresh = ControllerImpl(_args(model, **{**args, **change}))
        assert not fresh.recovering and not fresh.registry.shards and fresh.registry.version > version
        assert "other placement args" in caplog.text

    _with_shards(model, "abc", scenario)


def test_a_running_warm_up_resumes_with_the_new_cool_down():
    first = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=600)
    assert first.started()
    shorter = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=60)
    shorter.resume(first.state())
    assert abs(shorter._scale_in_from - (first._scale_in_from - 540)) < 0.01
    over = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=0)
    over.started()  # a warm-up of 0: over at once, and stays over under a longer cool-down
    longer = ScaleDecider(min_shards=1, max_shards=8, target_utilization=0.5, cooldown_s=3600)
    longer.resume(over.state())
    assert longer._scale_in_from <= time.monotonic()
