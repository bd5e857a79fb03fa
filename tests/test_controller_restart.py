"""Restarts and stops without Ray, over real in-process gRPC shards: a controller resuming from its record and the
shards' holdings, the table's long poll and acks, a shard replica stopping or retrying its registration."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

from elasticmoe.autoscaler import controller as controller_mod
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.experts.deployment import ExpertShard
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from tests.controller_util import (E, ControllerImpl, Shard, _args, _gateway_behind_a_move, _LoopHandle, _routed_to,
                                   _until, _with_shards)
from tests.controller_util import model  # noqa: F401 - a fixture


def test_table_long_poll_holds_until_a_new_version(model, monkeypatch):
    """A held poll ends at once on a new version: the cap is raised to 60 s so a poll that missed the bump (held to
    its 30 s) stays far from the 10 s bounds a loaded CI host needs."""
    monkeypatch.setattr(controller_mod, "TABLE_WAIT_MAX_S", 60.0)
    files = open_model(model)
    GcsRecord("default").clear()
    asyncio.run(_long_poll(files, model))


async def _long_poll(files, model):
    a = Shard(files, "a")
    ctrl = ControllerImpl(_args(model, num_shards=1))
    try:
        await a.join(ctrl)
        v = (await ctrl.table())["version"]
        t0 = time.monotonic()
        assert await ctrl.table(v, "g", wait_s=0.3) is None  # nothing new: held for wait_s, then None
        assert 0.3 <= time.monotonic() - t0 < 10.0 and ctrl.acks["g"][0] == v  # the caller's version acknowledged
        held = asyncio.ensure_future(ctrl.table(v, "g", wait_s=30.0))
        await asyncio.sleep(0.2)
        assert not held.done()
        t1 = time.monotonic()
        ctrl.registry.bump()
        table = await asyncio.wait_for(held, timeout=20.0)  # a new version ends the poll at once, not at 30 s
        assert table["version"] == v + 1 and time.monotonic() - t1 < 10.0
        t2 = time.monotonic()
        assert (await ctrl.table(v, "g", wait_s=30.0))["version"] == v + 1  # behind already: no wait at all
        assert time.monotonic() - t2 < 10.0
    finally:
        for task in ctrl._tasks:
            task.cancel()
        a.server.stop(None)


# ----- a stopping ExpertShard replica (its __del__): drain through a live controller; none to wait for when it is gone
ShardImpl = ExpertShard.func_or_class


class _Handle:
    """The call shape of a Serve handle over an in-process object: `handle.method.remote(*args)` is awaitable."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)
        return type("Method", (), {"remote": staticmethod(lambda *args: method(*args))})()


class _GoneHandle:
    """A deleted app's controller: Serve's router waits for a replica that never comes."""

    def __getattr__(self, name):
        return type("Method", (), {"remote": staticmethod(lambda *args: asyncio.get_running_loop().create_future())})()


class _Replica(ShardImpl):
    def __del__(self):  # the garbage collector's call; the tests call ShardImpl.__del__ as Serve does
        pass


async def _stop(replica) -> None:
    await asyncio.wait_for(ShardImpl.__del__(replica), 30)  # a hang fails the test instead of stalling it


def _stopping_replica(shard: Shard, controller) -> object:
    replica = object.__new__(_Replica)  # the replica's state as __init__ leaves it once registered
    replica.shard_id, replica.server, replica.controller = shard.shard_id, shard.server, controller
    replica.registered, replica.stopping, replica._ready_lock = threading.Event(), False, threading.Lock()
    replica.registered.set()
    return replica


def _refused(address: str, within_s: float = 5.0) -> bool:
    """Whether connections to address are refused within `within_s` (the shard's stop returns at once; grpc closes
    its listening socket on its own thread, which on a loaded machine takes a moment)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while True:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) != 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_stopping_shard_drains_through_a_live_controller(model):
    files = open_model(model)
    GcsRecord("default").clear()

    async def scenario():
        a, b = Shard(files, "a"), Shard(files, "b")
        try:
            ctrl = ControllerImpl(_args(model))
            await a.join(ctrl)
            await b.join(ctrl)
            await _stop(_stopping_replica(b, _Handle(ctrl)))
            table = await ctrl.table()
            assert [s["id"] for s in table["shards"]] == ["a"] and table["complete"]
            assert a.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(E)}  # b's moved first
            assert _refused(b.address)
            for task in ctrl._tasks:
                task.cancel()
        finally:
            a.server.stop(None)
            b.server.stop(None)

    asyncio.run(scenario())


def test_a_stopping_shard_with_its_controller_gone_stops_at_once(model, monkeypatch):
    from elasticmoe.experts import deployment

    monkeypatch.setattr(deployment, "CONTROLLER_PROBE_S", 0.3)
    shard = Shard(open_model(model), "x")
    t0 = time.monotonic()
    asyncio.run(_stop(_stopping_replica(shard, _GoneHandle())))
    assert time.monotonic() - t0 < 20  # the probe's 0.3 s and the server's stop, not Serve's kill 60 s later
    assert _refused(shard.address)


class _Result:
    def __init__(self, fn):
        self.fn = fn

    def result(self, timeout_s=None):
        return self.fn()


class _RetryController:
    """Registration answers plan A, then `ready` fails once (e.g. the shard was dropped meanwhile): the retry's
    register answers plan B (another position)."""

    def __init__(self, plans):
        self.plans, self.readies = list(plans), 0

        def register(shard_id, address):
            return _Result(lambda: self.plans.pop(0))

        def ready(shard_id):
            def go():
                self.readies += 1
                if self.readies == 1:
                    raise KeyError(f"shard {shard_id} is not registered")
                return 2
            return _Result(go)

        self.register = type("M", (), {"remote": staticmethod(register)})()
        self.ready = type("M", (), {"remote": staticmethod(ready)})()


def test_a_registration_retry_holds_only_the_new_plans_experts(model, monkeypatch):
    """A shard whose registration is retried loads the plan it is given then; experts of an earlier attempt's plan
    that the new one does not name are dropped, not kept (GPU memory the controller does not know is in use)."""
    from elasticmoe.experts import deployment
    from elasticmoe.experts.server import ExpertServicer

    monkeypatch.setattr(deployment.time, "sleep", lambda s: None)
    files = open_model(model)
    l0, l1 = files.spec.moe.moe_layers[:2]
    plan_a = [(l0, 0), (l0, 1), (l1, 2)]
    plan_b = [(l0, 1), (l1, 5)]
    replica = object.__new__(_Replica)
    replica.shard_id, replica.address, replica.weights = "r", "127.0.0.1:1", model  # plans naming no weights: taken
    replica.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    replica.servicer = ExpertServicer(replica.store, "r")
    replica.controller = _RetryController([{"experts": plan_a, "version": 1, "desired": 2},
                                           {"experts": plan_b, "version": 2, "desired": 2}])
    replica.registered, replica.stopping, replica.error = threading.Event(), False, None
    replica._ready_lock = threading.Lock()
    ShardImpl._register(replica)
    assert replica.registered.is_set() and replica.servicer.placement_version == 2
    assert replica.store.held() == sorted(plan_b)


def test_an_operators_shard_count_outlives_a_controller_restart(model):
    """set_target_shards pins the count; a restarted controller keeps the pin (it used to restore only the count,
    and the utilization policy then moved off the operator's number), and clearing it is remembered too."""
    GcsRecord("default").clear()
    args = _args(model, autoscaling={"min_shards": 1, "max_shards": 3})

    async def run():
        ctrl = ControllerImpl(args)
        assert await ctrl.set_target_shards(3) == 3
        again = ControllerImpl(args)
        assert again.recovering and again.desired == 3 and again.scale.override == 3
        assert again.scale.desired(again.desired, [0.0, 0.0, 0.0]) == 3  # idle shards: still the operator's 3
        assert await again.set_target_shards(None) == 3
        third = ControllerImpl(_args(model, autoscaling={"min_shards": 1, "max_shards": 3, "scale_cooldown_s": 0}))
        assert third.recovering  # a cool-down of its own: the record resumes all the same
        third.scale.started()  # its shards all live (a restarted controller's warm-up: 0 here)
        assert third.scale.override is None and third.scale.desired(third.desired, [0.0, 0.0, 0.0]) == 2
        for bad in (0, 4, 2.0, True):  # outside 1..3, or not a whole number: refused, not clamped
            with pytest.raises(ValueError, match=r"min_shards\.\.max_shards \(1\.\.3\)"):
                await third.set_target_shards(bad)
        assert third.scale.override is None and ControllerImpl(args).scale.override is None
        del ctrl

    asyncio.run(run())


def test_recovery_keeps_the_copies_a_gateway_may_still_route_to(model, monkeypatch):
    """The controller commits a move (its record saved: the new placement) and dies before any gateway polled the
    new table. The restarted controller must not drop the moved copies at once: a gateway still routes them to
    their old shard until it has installed a table of the new controller, and only then are they dropped."""
    import elasticmoe.autoscaler.moves as moves_module
    monkeypatch.setattr(moves_module, "GATEWAY_TTL_S", 2.0)

    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        for task in ctrl._tasks:
            task.cancel()  # the controller dies: its drop after the acks never runs
        moved = {(l, 0) for l in files.spec.moe.moe_layers}
        assert moved <= a.held() and moved <= b.held()

        ctrl2 = ControllerImpl(_args(model))
        assert ctrl2.recovering
        ctrl2._start()
        await _until(lambda: not ctrl2.recovering, 10, "recovery")
        await asyncio.sleep(0.3)
        assert _routed_to(old, "a") <= a.held()  # what the gateway still routes to a is there
        new = await ctrl2.table(old["version"], "g", 0.0, old["epoch"])  # the gateway installs the new table
        assert new["complete"] and all(_routed_to(new, s.shard_id) <= s.held() for s in (a, b))
        await ctrl2.table(new["version"], "g", 0.0, new["epoch"])  # and acknowledges it
        await _until(lambda: not moved & a.held(), 10, "the moved copies dropped from a")
        assert b.held() == set(ctrl2.registry.assignment(ctrl2.registry.shards["b"].position))
        for task in ctrl2._tasks:
            task.cancel()

    _with_shards(model, "ab", scenario)


def test_a_published_shard_retrying_registration_keeps_the_copies_gateways_route_to(model, monkeypatch):
    """a's ready() answer was lost after the controller published it, and a move then took expert 0 off a (its
    copies there are dropped once every gateway runs the new table). a's registration retry must not drop them on
    its own: gateway g still routes them to a. The controller's drop after the acks removes them."""
    import elasticmoe.autoscaler.moves as moves_module
    monkeypatch.setattr(moves_module, "GATEWAY_TTL_S", 30.0)

    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        moved = {(l, 0) for l in files.spec.moe.moe_layers}
        replica = object.__new__(_Replica)  # a's replica, retrying after its lost ready answer
        replica.shard_id, replica.address, replica.store, replica.servicer = "a", a.address, a.store, a.servicer
        replica.weights = ctrl.weights  # the plan's: the same model
        replica.controller = _LoopHandle(ctrl, asyncio.get_running_loop())
        replica.registered, replica.stopping, replica.error = threading.Event(), False, None
        replica._ready_lock = threading.Lock()
        await asyncio.to_thread(ShardImpl._register, replica)
        assert replica.registered.is_set() and _routed_to(old, "a") <= a.held()  # what g still routes to a is there
        new = await ctrl.table(old["version"], "g")
        assert new["complete"] and all(_routed_to(new, s.shard_id) <= s.held() for s in (a, b))
        await ctrl.table(new["version"], "g")  # g acknowledges the new table
        await _until(lambda: not moved & a.held(), 10, "the moved copies dropped from a after the acks")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "ab", scenario)


@pytest.mark.parametrize("corrupt", [
    lambda rec: rec["registry"]["placement"].update(layout=[]),  # no layers: would route nothing, "complete"
    lambda rec: rec["registry"]["placement"].pop("num_shards"),
    lambda rec: rec["registry"]["shards"].append({"id": "x"}),  # a shard entry without its fields
    lambda rec: rec.pop("registry"),
])
def test_a_record_that_cannot_be_restored_starts_the_controller_afresh(model, corrupt, caplog):
    """A readable record this app wrote whose registry does not restore (a bad placement or shard entry) is ignored
    with a warning, like an unreadable one: a controller that raised on it would be restarted by Serve into the same
    record, for good. The fresh start numbers its versions above the recorded one where that is readable."""
    import json

    GcsRecord("default").clear()
    args = _args(model)
    ControllerImpl(args)
    record = GcsRecord("default")
    rec = record.load()
    recorded = rec["registry"]["version"]
    corrupt(rec)
    record.save(rec)
    ctrl = ControllerImpl(args)
    assert not ctrl.recovering and ctrl.registry.placement.num_layers == 2 and not ctrl.registry.shards
    assert ctrl.registry.version > (recorded if "registry" in rec else 0)
    assert "record" in caplog.text
    assert json.loads(json.dumps(GcsRecord("default").load()))["registry"]["placement"]["layout"]  # written anew
    GcsRecord("default").clear()


def test_a_record_that_is_not_a_json_object_is_ignored(model):
    GcsRecord("default").clear()
    GcsRecord("default").save([1, 2])
    assert GcsRecord("default").load() is None
    ctrl = ControllerImpl(_args(model))
    assert not ctrl.recovering and ctrl.registry.version == 1
    GcsRecord("default").clear()


def test_a_recovery_that_raises_still_ends_and_the_controller_serves(model, monkeypatch):
    """A bug inside the recovery (here the first shard's holdings cannot be read: _held raises) must not leave the
    controller recovering for good: that state holds back re-homing, rebalancing and spares' growth. The error is
    logged and counted as a loop error, recovery ends, and a complete table is published."""

    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the controller dies; its record stays

        ctrl2 = ControllerImpl(_args(model))
        assert ctrl2.recovering
        real, calls = ctrl2._held, []

        async def held(address, shard_id):
            calls.append(shard_id)
            if len(calls) == 1:
                raise RuntimeError("a bug reading holdings")
            return await real(address, shard_id)

        monkeypatch.setattr(ctrl2, "_held", held)
        ctrl2._start()
        await _until(lambda: not ctrl2.recovering, 10, "recovery to end")
        assert calls and ctrl2.loop_errors >= 1
        table = await ctrl2.table(-1, "g")
        assert table["complete"] and table["epoch"] == ctrl2.epoch, table
        for task in ctrl2._tasks:
            task.cancel()

    _with_shards(model, "ab", scenario)
