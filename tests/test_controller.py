"""The controller's transitions without Ray, over real in-process gRPC shards: start, lose and re-home, restart from
its record, drain, a failed load rolled back, and what every published table says along the way."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import torch

from elasticmoe.autoscaler.controller import Controller
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.experts.deployment import ExpertShard
from elasticmoe.experts.server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

E = 8
ControllerImpl = Controller.func_or_class  # the class itself, outside Serve


class Shard:
    """An expert shard as the deployment runs it: a gRPC server over a store, registered with the controller."""

    def __init__(self, files, shard_id: str):
        self.shard_id = shard_id
        self.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
        self.server, self.servicer, port = start_server(self.store, shard_id)
        self.address = f"127.0.0.1:{port}"

    async def join(self, ctrl) -> None:
        plan = await ctrl.register(self.shard_id, self.address)
        self.store.load(plan["experts"])
        await ctrl.ready(self.shard_id)

    def held(self) -> set[tuple[int, int]]:
        return set(self.store.held())


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return str(make_tiny_model("mixtral", tmp_path_factory.mktemp("ctl") / "m", layers=2, experts=E))


def _args(model: str, **kw) -> dict:
    return {"model": model, "num_shards": 2, "dtype": "float32", "device": "cpu", **kw}


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _with_shards(model: str, names: str, scenario) -> None:
    """Run `scenario(files, *shards)` on a cleared GCS record with an in-process shard per letter of `names`; every
    shard's server stops afterwards, whatever happened."""
    files = open_model(model)
    GcsRecord("default").clear()

    async def run():
        shards = [Shard(files, x) for x in names]
        try:
            await scenario(files, *shards)
        finally:
            for s in shards:
                s.server.stop(None)

    asyncio.run(run())


def _live_copies(table: dict) -> list[list[int]]:
    return [[len(reps) for reps in experts] for experts in table["layers"].values()]


def test_lose_restart_drain_and_a_failed_load(model):
    files = open_model(model)
    GcsRecord("default").clear()
    asyncio.run(_scenario(files, model))


async def _scenario(files, model):
    a, b, c = Shard(files, "a"), Shard(files, "b"), Shard(files, "c")
    try:
        ctrl = ControllerImpl(_args(model, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)
        table = await ctrl.table()
        assert table["complete"] and len(table["shards"]) == 2
        assert all(n == 2 for row in _live_copies(table) for n in row)  # every expert on both shards
        v0 = table["version"]

        # lose b: every table published along the way keeps a live copy of every expert (make-before-break)
        seen: list[dict] = []
        b.server.stop(None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            t = await ctrl.table()
            seen.append(t)
            if len(t["shards"]) == 1 and "b" not in ctrl.registry.shards:
                break
            await asyncio.sleep(0.05)
        assert "b" not in ctrl.registry.shards and ctrl.event_counts.get("removed") == 1
        assert all(t["complete"] for t in seen) and all(n >= 1 for row in _live_copies(seen[-1]) for n in row)
        assert a.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(E)}
        assert (await ctrl.heartbeat("b", b.address))["known"] is False  # a zombie b would be replaced

        # restart: a new controller resumes from the record and the shards' holdings; versions only grow
        v1 = ctrl.registry.version
        for task in ctrl._tasks:
            task.cancel()
        ctrl2 = ControllerImpl(_args(model, expert_copies=2))
        assert ctrl2.recovering and ctrl2.registry.version > v1 > v0
        ctrl2._start()
        await _until(lambda: not ctrl2.recovering, 10, "recovery")
        table = await ctrl2.table()
        assert table["complete"] and [s["id"] for s in table["shards"]] == ["a"]
        assert (await ctrl2.heartbeat("a", a.address))["known"] is True

        # a spare whose first load fails: rolled back, nothing leaked, the old placement stays; the next one works
        c.servicer.faults.fail_loads = 1
        await c.join(ctrl2)
        assert ctrl2.registry.placement.num_shards == 1 and c.held() == set()
        assert ctrl2.event_counts.get("load_failed") == 1
        assert (await ctrl2.table())["complete"]
        async with ctrl2._lock:
            await ctrl2._grow()
        table = await ctrl2.table()
        assert table["complete"] and {s["id"] for s in table["shards"]} == {"a", "c"} and c.held()

        # drain c (scale-in): its experts are loaded elsewhere before it leaves the table
        table = await ctrl2.drain("c")
        assert table["complete"] and [s["id"] for s in table["shards"]] == ["a"]
        assert a.held() == {(l, e) for l in files.spec.moe.moe_layers for e in range(E)}
        for task in ctrl2._tasks:
            task.cancel()
    finally:
        for s in (a, b, c):
            s.server.stop(None)


def test_table_long_poll_holds_until_a_new_version(model):
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
        assert 0.3 <= time.monotonic() - t0 < 2.0 and ctrl.acks["g"][0] == v  # the caller's version acknowledged
        held = asyncio.ensure_future(ctrl.table(v, "g", wait_s=30.0))
        await asyncio.sleep(0.2)
        assert not held.done()
        t1 = time.monotonic()
        ctrl.registry.bump()
        table = await asyncio.wait_for(held, timeout=2.0)  # a new version ends the poll at once
        assert table["version"] == v + 1 and time.monotonic() - t1 < 0.5
        t2 = time.monotonic()
        assert (await ctrl.table(v, "g", wait_s=30.0))["version"] == v + 1  # behind already: no wait at all
        assert time.monotonic() - t2 < 0.5
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
    replica.registered, replica.stopping = threading.Event(), False
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


def test_a_failing_loop_is_logged_counted_and_keeps_running(model, monkeypatch, caplog):
    """README: the controller's loops "log and count errors instead of dying"."""
    import elasticmoe.autoscaler.controller as controller_module

    GcsRecord("default").clear()
    ctrl = ControllerImpl(_args(model))
    real_sleep = asyncio.sleep
    monkeypatch.setattr(controller_module.asyncio, "sleep", lambda s: real_sleep(0))
    runs = []

    async def _stats_once():
        runs.append(1)
        if len(runs) == 3:
            raise asyncio.CancelledError  # the test's way out: not an Exception, so not caught
        raise RuntimeError(f"failure {len(runs)}")

    async def scenario():
        with pytest.raises(asyncio.CancelledError):
            await ctrl._forever(_stats_once)
        return await ctrl.status()

    with caplog.at_level("ERROR", logger=controller_module.log.name):
        status = asyncio.run(scenario())
    assert len(runs) == 3  # two failures did not end the loop
    assert ctrl.loop_errors == 2 and status["loop_errors"] == 2 and status["event_counts"]["loop_error"] == 2
    assert sum("controller loop _stats_once failed" in r.getMessage() for r in caplog.records) == 2


def test_two_shards_lost_together_are_re_homed(model):
    """Two of four shards die at once (a node goes): the re-home of either must not plan copies onto the other
    (loads there fail, and each retry failed the same way: the table stayed incomplete for good). One health
    round finds both dead: neither re-home tries the other (no failed load)."""
    async def scenario(files, a, b, c, d):
        ctrl = ControllerImpl(_args(model, num_shards=4))
        for s in (a, b, c, d):
            await s.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the health round below is the only one
        b.server.stop(None)
        c.server.stop(None)
        await ctrl._health_once()
        assert set(ctrl.registry.shards) == {"a", "d"} and not ctrl.event_counts.get("load_failed")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "d"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, d))

    _with_shards(model, "abcd", scenario)


def test_copies_metric_counts_live_copies_only(model):
    """elasticmoe_expert_copies is the live copies of each expert: a lone shard that dies (nothing to re-home onto)
    leaves every expert with 0, not the placement's 1."""
    async def scenario(files, a):
        ctrl = ControllerImpl(_args(model, num_shards=1))
        await a.join(ctrl)
        await _until(lambda: ctrl.metrics.expert_copies and set(ctrl.metrics.expert_copies.values()) == {1}, 10,
                     "one copy of every expert exported")
        a.server.stop(None)
        await _until(lambda: ctrl.event_counts.get("unhealthy"), 10, "the shard marked unhealthy")
        await _until(lambda: set(ctrl.metrics.expert_copies.values()) == {0}, 5, "no live copy exported")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "a", scenario)


def test_scale_out_after_scaling_in_to_one_shard(model):
    """4 shards (3 slots each for 8 experts) drained down to 1 (which then holds all 8), then a new replica joins:
    the placement grows onto it. Planning 2 shards with the initial 3 slots each (6 < 8 experts) raised
    ValueError out of ready(), so the new replica never joined."""
    async def scenario(files, *shards):
        a, e = shards[0], shards[-1]
        ctrl = ControllerImpl(_args(model, num_shards=4))
        assert ctrl.slots == 3
        for s in shards[:4]:
            await s.join(ctrl)
        for s in shards[1:4]:
            await ctrl.drain(s.shard_id)
        assert ctrl.registry.placement.num_shards == 1
        await e.join(ctrl)
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "e"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, e))
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abcde", scenario)


def test_a_replacement_registering_during_a_re_home_holds_only_its_assignment(model):
    """b dies and its experts are being loaded elsewhere when its replacement e registers: e must not be handed
    b's position (and b's experts to load) that the re-home is about to retire, or e ends up a spare holding
    copies no placement assigns it, which are never dropped (more than its slots)."""
    async def scenario(files, a, b, c, e):
        ctrl = ControllerImpl(_args(model, num_shards=3))
        for s in (a, b, c):
            await s.join(ctrl)
        b.server.stop(None)

        async def health_loop_loses_b():
            async with ctrl._start():
                await ctrl._lose("b", "health check failed")

        lose = asyncio.ensure_future(health_loop_loses_b())
        while ctrl.registry.shards["b"].healthy:
            await asyncio.sleep(0)
        await e.join(ctrl)  # registers while the re-home loads b's experts onto a and c
        await lose
        reg = ctrl.registry
        exact = lambda s: s.held() == set(reg.assignment(reg.shards[s.shard_id].position))  # noqa: E731
        await _until(lambda: all(exact(s) for s in (a, c, e)), 5, "every shard holding exactly its assignment")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "c", "e"]
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abce", scenario)


def test_shard_health_metric_is_whether_the_shard_answers(model):
    """elasticmoe_shard_healthy is 1 for a shard that answers, also one still loading its experts (a replica
    starting, or a spare on scale out), not only for those in the table; 0 once it stops answering."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await ctrl.register("b", b.address)  # still loading
        await c.join(ctrl)
        for task in ctrl._tasks:
            task.cancel()  # the rounds below are the only ones
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True, "b": True, "c": True}
        c.server.stop(None)
        async with ctrl._lock:
            ctrl._mark_failed([ctrl.registry.shards["c"]], "health check failed")  # before its re-home
        await ctrl._stats_once()
        assert ctrl.metrics.shards == {"a": True, "b": True, "c": False}

    _with_shards(model, "abc", scenario)


def test_rebalance_waits_for_a_shard_that_never_registered(model):
    """With 2 copies of every expert the placement is complete before its third shard registers; a rebalance
    then must not plan copies onto that empty position (there is no one to load them: it raised KeyError every
    round) but wait, and work once the shard is there."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model, num_shards=3, expert_copies=2))
        await a.join(ctrl)
        await b.join(ctrl)
        assert (await ctrl.table())["complete"]
        await ctrl._stats_once()  # the baselines
        for s in (a, b):
            for layer in files.spec.moe.moe_layers:
                s.store.count(layer, {0: 5000, 1: 3000})  # two hot experts
        await ctrl._stats_once()
        version = ctrl.registry.version
        await ctrl.rebalance()
        assert ctrl.registry.version == version and not ctrl.event_counts.get("placement")
        await c.join(ctrl)
        await ctrl.rebalance()
        assert ctrl.event_counts.get("placement") == 1 and (await ctrl.table())["complete"]
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abc", scenario)


# ----- the load tracker: per-expert token rates from the shards' cumulative counters
def test_load_tracker_counts_only_tokens_served_since_a_shard_was_last_seen():
    """A shard first seen (a restarted controller) or back after a missed stats round adds only the tokens served
    since the tracker last read its counters: its lifetime total is not one interval's rate."""
    from elasticmoe.autoscaler.policy import LoadTracker

    tracker = LoadTracker(1, 2, half_life_s=1e-3)  # the EMA follows the last rate
    layers = {5: 0}
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_000}, 100.0)}, layers)  # served before this controller started
    assert tracker.ema.max() == 0.0 and tracker.utilization["a"] == 0.0
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_010}, 100.0)}, layers)
    assert 0 < tracker.ema[0, 0] <= 10 / 0.05
    time.sleep(0.05)
    tracker.update({}, layers)  # a's GetStats timed out this round
    time.sleep(0.05)
    tracker.update({"a": ({(5, 0): 1_000_020}, 100.0)}, layers)
    assert tracker.ema[0, 0] <= 10 / 0.05  # 10 tokens since it was last read, not 1_000_020


def _routed_to(table: dict, shard_id: str) -> set[tuple[int, int]]:
    """(model layer, expert) pairs the table routes to `shard_id`."""
    i = [s["id"] for s in table["shards"]].index(shard_id)
    return {(int(l), e) for l, experts in table["layers"].items() for e, reps in enumerate(experts)
            if any(s == i for s, _ in reps)}


def test_spares_ready_out_of_order_keep_distinct_positions(model):
    """Two replicas join as spares (scale out) and the second reports ready first: placing it must not leave the
    first on the position it was given, or both hold that position and draining the empty one re-homes the
    other's experts and leaves it an idle spare."""
    async def scenario(files, a, b, c, d):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        assert (await ctrl.register("c", c.address))["position"] == 2  # c is still starting
        await d.join(ctrl)  # d overtakes it: the placement grows onto d
        await ctrl.ready("c")
        positions = [s.position for s in ctrl.registry.shards.values()]
        assert len(set(positions)) == len(positions), positions
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "d", "c"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b, c, d))
        table = await ctrl.drain("c")  # scale-in picks c: d keeps its place and its experts
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b", "d"]
        assert all(_routed_to(table, s.shard_id) <= s.held() for s in (a, b, d))
        assert _routed_to(table, "d")
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abcd", scenario)


def test_scale_out_is_not_compounded_while_new_shards_start():
    """The shard count follows the work the live shards report: while the replicas asked for are still starting
    (longer than the cool-down: loading a large model's experts), the same busy shards do not ask for more again."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0)
    assert decide.desired(2, [1.0, 1.0]) == 4  # 2 shards' work at 0.5 each
    assert decide.desired(4, [1.0, 1.0]) == 4  # 2 more asked for, not live yet: still 4, not 8
    assert decide.desired(4, [0.6, 0.6, 0.6, 0.6]) == 5
    assert decide.desired(5, [0.1] * 5) == 4  # scale in one at a time


def test_scale_in_is_not_compounded_while_drained_shards_still_serve():
    """While the shards a scale-in let go still drain (still live), their low utilization must not take the count
    below what the work needs: 4 live shards at 0.15 (0.6 in all) need 2 at a 0.5 target, not 1."""
    from elasticmoe.autoscaler.policy import ScaleDecider

    decide = ScaleDecider(min_shards=1, max_shards=16, target_utilization=0.5, cooldown_s=0.0)
    assert decide.desired(4, [0.15] * 4) == 3
    assert decide.desired(3, [0.15] * 4) == 2  # one is draining
    assert decide.desired(2, [0.15] * 4) == 2  # two are: one shard would run at 0.6
    assert decide.desired(2, [0.2, 0.2]) == 1


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
    replica.shard_id, replica.address = "r", "127.0.0.1:1"
    replica.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    replica.servicer = ExpertServicer(replica.store, "r")
    replica.controller = _RetryController([{"experts": plan_a, "version": 1}, {"experts": plan_b, "version": 2}])
    replica.registered, replica.stopping, replica.error = threading.Event(), True, None  # stopping: no heartbeats
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
        third = ControllerImpl(args)
        assert third.scale.override is None and third.scale.desired(third.desired, [0.0, 0.0, 0.0]) == 2
        del ctrl

    asyncio.run(run())


def _moved(cur, src: int, dst: int, expert: int):
    """`cur` with `expert` of every layer moved from position `src` to `dst`."""
    from elasticmoe.placement import Placement

    holds, shares = cur.holds(), cur.shares()  # [L, E, N]
    holds[:, expert, dst], shares[:, expert, dst] = True, shares[:, expert, src]
    holds[:, expert, src], shares[:, expert, src] = False, 0.0
    return Placement.from_arrays(shares, holds, cur.slots_per_shard)


def test_recovery_keeps_the_copies_a_gateway_may_still_route_to(model, monkeypatch):
    """The controller commits a move (its record saved: the new placement) and dies before any gateway polled the
    new table. The restarted controller must not drop the moved copies at once: a gateway still routes them to
    their old shard until it has installed a table of the new controller, and only then are they dropped."""
    import elasticmoe.autoscaler.moves as moves_module
    from elasticmoe.autoscaler.registry import Change

    monkeypatch.setattr(moves_module, "GATEWAY_TTL_S", 2.0)

    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        old = await ctrl.table(-1, "g")
        assert await ctrl.table(old["version"], "g") is None  # the gateway runs `old`
        cur = ctrl.registry.placement
        async with ctrl._lock:
            await ctrl._apply(Change(cur, _moved(cur, 0, 1, 0), {0: 0, 1: 1}), "test move")
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


def test_a_shard_loading_its_plan_while_a_re_home_loads_onto_it_holds_its_assignment(model):
    """c registers and, before it applies its plan (as ExpertShard._register does: drop what the plan does not
    name, load the rest, report ready), b dies and its re-home loads copies onto c. Applying the now stale plan
    dropped them again: the table routed them to c, which answered `missing`. Ready makes c hold its assignment."""
    async def scenario(files, a, b, c):
        ctrl = ControllerImpl(_args(model, num_shards=3))
        await a.join(ctrl)
        await b.join(ctrl)
        plan = await ctrl.register("c", c.address)
        b.server.stop(None)
        async with ctrl._lock:
            await ctrl._lose("b", "health check failed")
        reg = ctrl.registry
        assert set(reg.assignment(reg.shards["c"].position)) - set(plan["experts"])  # the re-home loaded onto c
        c.store.drop(c.held() - set(plan["experts"]))  # c applies its plan only now
        c.store.load(plan["experts"])
        await ctrl.ready("c")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "c"]
        assert all(s.held() == set(reg.assignment(reg.shards[s.shard_id].position)) for s in (a, c))
        for task in ctrl._tasks:
            task.cancel()

    _with_shards(model, "abc", scenario)
