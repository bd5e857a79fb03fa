"""The controller's Serve user_config (config.ScaleConfig, the Helm chart's): shard bounds applied to the running
controller in place, and the count a controller starting with no record to resume (a new cluster) starts at.
Controllers without Ray over real in-process gRPC shards."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from elasticmoe.autoscaler.record import GcsRecord
from tests.controller_util import ControllerImpl, _args, _quiet, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _auto(n: int = 2, **kw) -> dict:
    return {"num_shards": n, "autoscaling": {"min_shards": 1, "max_shards": 6, **kw}}


def _scale(lo: int = 1, hi: int = 6, start: int | None = None) -> dict:
    return {"min_shards": lo, "max_shards": hi, **({} if start is None else {"start_shards": start})}


def test_serve_hands_the_user_config_to_reconfigure():
    """Serve calls `reconfigure(user_config)` after __init__ and on each change; with a `rank` parameter it would
    call it on every rank change too (and refuse a user_config without the method)."""
    assert list(inspect.signature(ControllerImpl.reconfigure).parameters) == ["self", "config"]


def test_a_new_cluster_starts_at_start_shards(model):  # noqa: F811
    """The chart's upgrade rolls out a new cluster while the old one runs 4 shards; the args still say num_shards 2
    (a change there would rebuild the application on every upgrade). The new controller spreads its first placement
    over 4 shards and asks Serve for 4: four shards take a position each and the table is staffed."""
    async def scenario(files, a, b, c, d):
        ctrl = ControllerImpl(_args(model, **_auto()))
        await ctrl.reconfigure(_scale(start=4))
        assert ctrl.registry.placement.num_shards == 4 and ctrl.desired == 4
        for s in (a, b, c, d):
            await s.join(ctrl)
        assert ctrl.registry.staffed() and not ctrl.registry.spares()
        assert sorted(i.position for i in ctrl.registry.shards.values()) == [0, 1, 2, 3]
        assert all(s.held() for s in (a, b, c, d))
        for task in list(ctrl._tasks):
            task.cancel()

    _with_shards(model, "abcd", scenario)


def test_a_running_or_resumed_controller_ignores_start_shards(model):  # noqa: F811
    """An upgrade at another scale sends start_shards again: the running controller keeps its placement and count,
    and so does one that restarts and resumes its record."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b, **_auto())
        placement = ctrl.registry.placement.to_dict()
        await ctrl.reconfigure(_scale(start=5))
        assert ctrl.registry.placement.to_dict() == placement and ctrl.desired == 2
        again = ControllerImpl(_args(model, **_auto()))
        assert again.recovering
        await again.reconfigure(_scale(start=5))
        assert again.registry.placement.to_dict() == placement and again.desired == 2

    _with_shards(model, "ab", scenario)


def test_new_bounds_apply_in_place(model):  # noqa: F811
    """A running controller over 3 shards: a max of 2 brings its count to 2 and refuses a pin of 3; a min of 4 brings
    it to 4; the count is saved; no shard reloaded anything."""
    async def scenario(files, a, b, c):
        ctrl = await _quiet(model, a, b, c, **_auto(3))
        layers = files.spec.moe.moe_layers
        weights = {(s.shard_id, l): s.store.snapshot(l) for s in (a, b, c) for l in layers}
        await ctrl.reconfigure(_scale(1, 2))
        assert ctrl.desired == 2 and (ctrl.scale.min_shards, ctrl.scale.max_shards) == (1, 2)
        with pytest.raises(ValueError, match=r"outside autoscaling's min_shards..max_shards \(1..2\)"):
            await ctrl.set_target_shards(3)
        await ctrl.reconfigure(_scale(4, 6))
        assert ctrl.desired == 4 and GcsRecord("default").load()["desired"] == 4
        assert await ctrl.set_target_shards(5) == 5
        await ctrl.reconfigure(_scale(1, 3))  # the pin is held to the new bounds
        assert ctrl.desired == 3 and ctrl.scale.override == 5
        assert all(s.store.snapshot(l) is weights[s.shard_id, l] for s in (a, b, c) for l in layers)

    _with_shards(model, "abc", scenario)


@pytest.mark.parametrize("args, config, message", [
    (_auto(), _scale(5, 2), r"user_config.min_shards \(5\) > max_shards \(2\)"),
    (_auto(), _scale(1, 8), r"min_shards..max_shards \(1..8\) must lie within args autoscaling.min_shards..max_shards "
                            r"\(1..6\)"),
    (_auto(), _scale(1, 6, start=7), r"start_shards \(7\) must lie in \[min_shards, max_shards\] = \[1, 6\]"),
    (_auto(), {**_scale(), "max_shard": 3}, "max_shard"),
    ({"num_shards": 2}, _scale(), "need args.autoscaling"),
    (_auto(2, slots_per_shard=4), _scale(1, 6, start=1),
     r"user_config.start_shards \(1\): num_shards \* slots_per_shard = 4 < num_experts \* copies = 8"),
])
def test_a_bad_user_config_is_refused_naming_the_field_and_changes_nothing(model, args, config, message):  # noqa: F811
    GcsRecord("default").clear()

    async def run():
        ctrl = ControllerImpl(_args(model, **args))
        before = (ctrl.registry.placement.to_dict(), ctrl.desired, ctrl._fresh)
        bounds = (ctrl.scale.min_shards, ctrl.scale.max_shards) if ctrl.scale else None
        with pytest.raises(ValueError, match=message):
            await ctrl.reconfigure(config)
        assert (ctrl.registry.placement.to_dict(), ctrl.desired, ctrl._fresh) == before
        assert bounds == ((ctrl.scale.min_shards, ctrl.scale.max_shards) if ctrl.scale else None)

    asyncio.run(run())
    GcsRecord("default").clear()
