"""A rolling update across a change of model or revision (`serve deploy` with new args replaces every replica a few at
a time): for a while old gateways poll the new controller and new shards may register with the old one. Neither
mixes the two checkpoints: a gateway takes no table of a controller of other weights (config.weights_id), a shard
loads no plan of one. Real parts: two tiny checkpoints of the same shapes and other weights, real controllers on an
event loop, a real gateway core (engine, poller) and a real shard replica (its gRPC server). No Ray."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from elasticmoe import status_view
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.config import AppArgs, weights_id
from elasticmoe.experts import deployment
from elasticmoe.experts.deployment import ExpertShard
from elasticmoe.gateway.deployment import GatewayCore
from elasticmoe.model import open_model
from elasticmoe.model.tiny import make_tiny_model
from tests.controller_util import ControllerImpl, Shard, _args, _LoopHandle, on_loop, wait_until

E = 8


class _Replica(ExpertShard.func_or_class):
    def __del__(self):  # Serve awaits the real one when it stops a replica; the test stops this one itself
        pass


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two revisions of one model: the same family and shapes, other weights."""
    root = tmp_path_factory.mktemp("revisions")
    return tuple(str(make_tiny_model("mixtral", root / name, layers=2, experts=E, seed=seed))
                 for name, seed in (("a", 0), ("b", 1)))


@pytest.fixture
def loop():
    """An event loop thread for the controllers; torch's thread count restored (the replicas set it)."""
    GcsRecord("default").clear()
    threads = torch.get_num_threads()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="controller-loop", daemon=True)
    runner.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)
    torch.set_num_threads(threads)
    GcsRecord("default").clear()


def _controller(loop, model: str, *shards: Shard):
    """A controller of one shard position over `model`, `shards` joined, its loops cancelled when the test ends."""
    async def make():
        ctrl = ControllerImpl(_args(model, num_shards=1))
        for s in shards:
            await s.join(ctrl)
        return ctrl
    return on_loop(loop, make())


def _stop(loop, ctrl) -> None:
    for task in list(ctrl._tasks):
        loop.call_soon_threadsafe(task.cancel)


def test_a_gateway_takes_no_table_of_a_controller_of_other_weights(checkpoints, loop, caplog):
    """An old gateway (revision a) polls the new controller (revision b), whose table routes to b's shard. Before, it
    installed that table: its dense layers of a summed the experts of b, and it served with no error."""
    a, b = checkpoints
    shard = Shard(open_model(b), "b0")
    ctrl = _controller(loop, b, shard)
    core = GatewayCore(_args(a, num_shards=1), _LoopHandle(ctrl, loop))
    try:
        assert not core.complete.wait(3.0)  # many polls answered meanwhile: none installed
        assert core.dispatcher.latest() is None
        mine, theirs = weights_id(AppArgs(**_args(a))), weights_id(AppArgs(**_args(b)))
        refusals = [r.getMessage() for r in caplog.records if "of other weights" in r.getMessage()]
        assert len(refusals) == 1 and mine in refusals[0] and theirs in refusals[0]  # once, naming both
        acks = dict(ctrl.acks)  # the first poll's, before its answer was refused
        time.sleep(2.5)  # two more polls at least
        assert ctrl.acks == acks  # no more: not counted among the gateways that run its tables (drops wait for it)

        table = on_loop(loop, ctrl.table())
        del table["weights"]  # a controller that predates the field: taken (nothing tells the weights apart)
        core._install(table)
        assert core.complete.is_set() and core.dispatcher.latest().shards == ("b0",)
    finally:
        core.close()
        _stop(loop, ctrl)
        shard.server.stop(None)


def test_a_gateway_takes_the_table_of_a_controller_of_its_weights(checkpoints, loop):
    a, _ = checkpoints
    shard = Shard(open_model(a), "a0")
    ctrl = _controller(loop, a, shard)
    core = GatewayCore(_args(a, num_shards=1), _LoopHandle(ctrl, loop))
    try:
        assert core.complete.wait(10.0)
        assert core.dispatcher.latest().shards == ("a0",)
    finally:
        core.close()
        _stop(loop, ctrl)
        shard.server.stop(None)


def test_a_shard_loads_no_plan_of_a_controller_of_other_weights(checkpoints, loop, monkeypatch):
    """A new shard (revision b) registers with the old controller (revision a). Before, it loaded the plan from its own
    checkpoint and got ready: the old gateways routed a's experts to b's weights. Now it loads nothing, and the
    controller's status shows why, naming both, until a controller of its weights places it."""
    monkeypatch.setattr(deployment, "PLAN_RETRY_S", 0.2)
    monkeypatch.setattr(deployment, "PLAN_RETRY_MAX_S", 0.4)
    a, b = checkpoints
    old = _controller(loop, a)
    replica = _Replica(_args(b, num_shards=1), _LoopHandle(old, loop))
    try:
        wait_until(lambda: any(s.load_error for s in old.registry.shards.values()), 30, "the refusal reported")
        time.sleep(1.0)  # a few more tries
        assert not replica.registered.is_set() and replica.store.held() == []
        (entry,) = on_loop(loop, old.status())["shards"]
        assert not entry["ready"] and status_view.health(entry) == "failed"
        mine, theirs = weights_id(AppArgs(**_args(b))), weights_id(AppArgs(**_args(a)))
        assert mine in entry["load_error"] and theirs in entry["load_error"]
        assert old._table()["shards"] == []

        _stop(loop, old)
        GcsRecord("default").clear()
        new = _controller(loop, b)  # the rollout's new controller: the shard joins it
        replica.controller = _LoopHandle(new, loop)
        wait_until(replica.registered.is_set, 30, "the shard ready with a controller of its weights")
        assert len(replica.store.held()) == 2 * E and [s["id"] for s in new._table()["shards"]] == [replica.shard_id]
        _stop(loop, new)
    finally:
        replica._stop_registering()
        replica.server.stop(None)
