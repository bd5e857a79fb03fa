"""A shard applying its registration plan (ExpertShard._register) while the controller's LoadExperts / DropExperts
reach its server: the plan is applied as they are, one at a time with them, and never lowers the placement version.
A replica stopped while registering gives up and never reports ready."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from elasticmoe.experts.server import ExpertServicer
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from tests.controller_util import Shard
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.test_controller_restart import ShardImpl, _Replica, _Result


class _PlanController:
    """register answers `plan` (version `version`); ready answers at once."""

    def __init__(self, plan, version):
        answer = {"experts": plan, "version": version, "desired": 2}
        self.register = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: answer))})()
        self.ready = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: version))})()


def _replica(files, plan, version) -> _Replica:
    replica = object.__new__(_Replica)
    replica.shard_id, replica.address, replica.weights = "r", "127.0.0.1:1", "w"  # plans naming no weights: taken
    replica.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    replica.servicer = ExpertServicer(replica.store, "r")
    replica.controller = _PlanController(plan, version)
    replica.registered, replica.stopping, replica.error = threading.Event(), False, None
    replica._ready_lock = threading.Lock()
    return replica


def test_a_drop_counts_only_itself_while_the_registration_plan_loads(model):  # noqa: F811
    """DropExperts' dropped / bytes count that call's own drop: the plan applied between the drop and its count
    (it drops what it does not name, loads the rest) made them the sum of both, or negative (uint fields: the call
    failed though the drop was done)."""
    files = open_model(model)
    l0, l1 = files.spec.moe.moe_layers[:2]
    replica = _replica(files, [(l1, e) for e in range(4)], 1)
    store, servicer = replica.store, replica.servicer
    store.load([(l0, 0), (l0, 1)])
    one, drop = store.weight_bytes() // 2, store.drop

    registering = threading.Thread(target=ShardImpl._register, args=(replica,), daemon=True)

    def drop_then_the_plan_lands(pairs) -> None:
        store.drop = drop  # once: the plan's own drop is a plain one (else each drop would start a registration)
        drop(pairs)
        registering.start()
        registering.join(timeout=1.0)  # with the plan applied as LoadExperts are, it waits for this call to answer

    store.drop = drop_then_the_plan_lands
    reply = servicer.DropExperts(pb.DropExpertsRequest(experts=[pb.ExpertRef(layer=l0, expert=0)]), None)
    assert (reply.dropped, reply.bytes) == (1, one)
    assert replica.registered.wait(30) and store.held() == [(l1, e) for e in range(4)]  # the plan, applied after
    registering.join(30)
    assert not registering.is_alive()


def test_the_registration_plan_does_not_lower_the_placement_version(model):  # noqa: F811
    """A LoadExperts of a newer placement (version 5) reached the shard before it applied a plan of version 3."""
    files = open_model(model)
    l0 = files.spec.moe.moe_layers[0]
    replica = _replica(files, [(l0, 0)], 3)
    replica.servicer.LoadExperts(pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l0, expert=1)],
                                                       placement_version=5), None)
    ShardImpl._register(replica)
    assert replica.registered.is_set() and replica.servicer.placement_version == 5


class _StallingController:
    """register raises (`failing`: the controller is starting) or answers a plan once `release` is set (the shard
    is still asking while it stops); counts the calls to ready."""

    def __init__(self, failing: bool):
        self.asked, self.release, self.readies = threading.Event(), threading.Event(), 0

        def register(*a):
            self.asked.set()
            if failing:
                raise RuntimeError("injected: the controller is starting")
            self.release.wait(30)
            return {"experts": [], "version": 1, "desired": 2}

        def ready(*a):
            self.readies += 1
            return 1

        self.register = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: register(*a)))})()
        self.ready = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: ready(*a)))})()


@pytest.mark.parametrize("failing", [False, True], ids=["plan-in-flight", "retrying"])
def test_a_replica_stopped_while_registering_does_not_report_ready(model, failing):  # noqa: F811
    """Serve stops a replica still registering: __del__ finds it unregistered and skips the drain. Its registration
    went on (up to 600 attempts) and could report ready afterwards, publishing a stopped shard to the gateways."""
    files = open_model(model)
    shard = Shard(files, "r")
    replica = _replica(files, [], 1)
    replica.server, replica.controller = shard.server, _StallingController(failing)
    registering = threading.Thread(target=ShardImpl._register, args=(replica,), daemon=True)
    try:
        registering.start()
        assert replica.controller.asked.wait(10)
        asyncio.run(asyncio.wait_for(ShardImpl.__del__(replica), 30))
        replica.controller.release.set()
        registering.join(10)
        assert not registering.is_alive() and replica.controller.readies == 0 and not replica.registered.is_set()
    finally:
        replica.controller.release.set()
        shard.server.stop(None)


def test_a_starting_replica_reports_the_controllers_count_not_its_configs(model):  # noqa: F811
    """Serve scales the shards to the largest desired_shards any replica reports, at once (upscale_delay_s 0). A
    replica still starting reported the config's num_shards until its first heartbeat (after loading its plan), so
    each replacement or scale out while the controller wanted fewer (idle, or the operator's count) scaled the
    deployment up to num_shards. It reports nothing until the controller has answered it, then the controller's
    count."""
    from elasticmoe.autoscaler.record import GcsRecord
    from tests.controller_util import ControllerImpl, _args, _LoopHandle, _until

    files = open_model(model)
    GcsRecord("default").clear()
    threads = torch.get_num_threads()  # the replica sets its process's torch threads (shard_resources.num_cpus)

    async def scenario():
        args = _args(model, autoscaling={"min_shards": 1, "max_shards": 3})
        ctrl, a = ControllerImpl(args), Shard(files, "a")
        replica = None
        try:
            await a.join(ctrl)
            assert await ctrl.set_target_shards(1) == 1  # the operator's count, below num_shards (2)
            replica = _Replica(args, _LoopHandle(ctrl, asyncio.get_running_loop()))  # its register waits for us
            assert replica.record_autoscaling_stats().get("desired_shards", 1) == 1  # not the config's 2
            await _until(replica.registered.is_set, 30, "the new replica registered")
            assert replica.record_autoscaling_stats() == {"desired_shards": 1.0}
        finally:
            if replica is not None:
                await asyncio.to_thread(replica._stop_registering)
                replica.server.stop(None)
            a.server.stop(None)
            for task in ctrl._tasks:
                task.cancel()
        await _until(lambda: not any(t.name == "register" for t in threading.enumerate()), 10, "its thread to end")

    try:
        asyncio.run(scenario())
    finally:
        torch.set_num_threads(threads)
