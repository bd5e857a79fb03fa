"""A shard applying its registration plan (ExpertShard._register) while the controller's LoadExperts / DropExperts
reach its server: the plan is applied as they are, one at a time with them, and never lowers the placement version."""

from __future__ import annotations

import threading

import torch

from elasticmoe.experts.server import ExpertServicer
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.test_controller_restart import ShardImpl, _Replica, _Result


class _PlanController:
    """register answers `plan` (version `version`); ready answers at once."""

    def __init__(self, plan, version):
        answer = {"experts": plan, "version": version}
        self.register = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: answer))})()
        self.ready = type("M", (), {"remote": staticmethod(lambda *a: _Result(lambda: version))})()


def _replica(files, plan, version) -> _Replica:
    replica = object.__new__(_Replica)
    replica.shard_id, replica.address = "r", "127.0.0.1:1"
    replica.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    replica.servicer = ExpertServicer(replica.store, "r")
    replica.controller = _PlanController(plan, version)
    replica.registered, replica.stopping, replica.error = threading.Event(), True, None  # stopping: no heartbeats
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
