"""Routing-table versions across controller restarts: a gateway refuses a stale answer of the controller it follows
and obeys a restarted one (whose versions start over without its GCS record, or repeat one it never saved)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.gateway.deployment import GatewayCore
from elasticmoe.gateway.dispatcher import GrpcDispatcher, RoutingTable
from tests.controller_util import ControllerImpl, _LoopHandle, _args, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


def _table(version: int, epoch: str, shard: str = "a") -> dict:
    return {"version": version, "epoch": epoch, "complete": True, "layers": {1: [[(0, 1.0)], [(0, 1.0)]]},
            "shards": [{"id": shard, "address": "127.0.0.1:1", "position": 0}]}


def _init_poller_state(core: GatewayCore, dispatcher: GrpcDispatcher, weights: str = "") -> None:
    """A GatewayCore's table state around a real dispatcher (what its poller's _install touches), of `weights`
    (config.weights_id; the hand-made tables below name none, as a controller's that predates the field)."""
    core.dispatcher, core.complete, core.table_version, core.table_epoch = dispatcher, threading.Event(), -1, None
    core._install_lock = threading.Lock()
    core.weights, core.refused = weights, None


def _poller_of(dispatcher: GrpcDispatcher) -> GatewayCore:
    core = object.__new__(GatewayCore)
    _init_poller_state(core, dispatcher)
    return core


def test_a_stale_poll_answer_does_not_roll_the_table_back():
    d = GrpcDispatcher(insecure=True, transport="unary")
    try:
        core = _poller_of(d)
        core._install(_table(3, "c1"))
        d.set_table(RoutingTable.from_dict(_table(5, "c1", "b")))  # the failure-report path's newer answer
        core._install(_table(4, "c1"))  # the poll answered before that, delivered after it
        assert (d.latest().version, d.latest().shards) == (5, ("b",)) and core.table_version == 3
        core._install(_table(5, "c1", "b"))  # the next poll, still at 3, brings the newest at once
        assert (d.latest().version, core.table_version, core.table_epoch) == (5, 5, "c1")

        core._install(_table(1, "c2"))  # a restarted controller without its record: versions start over
        assert (d.latest().version, d.latest().epoch) == (1, "c2")
        d.set_table(RoutingTable.from_dict(_table(5, "c1")))  # the old controller's late answer
        assert d.latest().epoch == "c2"
        core._install(_table(1, "c3", "b"))  # another restart, the same version: still the new controller's word
        assert (d.latest().epoch, d.latest().shards, core.table_epoch) == ("c3", ("b",), "c3")
    finally:
        d.close()


def test_the_epochs_refused_are_those_whose_answers_can_still_come(monkeypatch):
    """Every controller instance the gateway moved on from stayed refused for the gateway's life: one entry per
    controller restart, for weeks. Only the recent ones are kept (an old instance answers only calls made before its
    successor's first table, or for its graceful shutdown): LEFT_EPOCHS_MAX at most, none after LEFT_EPOCH_TTL_S."""
    from elasticmoe.gateway import dispatcher

    d = GrpcDispatcher(insecure=True, transport="unary")
    try:
        for i in range(200):  # a controller restarting over and over
            assert d.set_table(RoutingTable.from_dict(_table(1, f"c{i}")))
        assert len(d._left_epochs) == dispatcher.LEFT_EPOCHS_MAX
        for i in range(199 - dispatcher.LEFT_EPOCHS_MAX, 199):  # the latest left: their late answers are refused
            assert not d.set_table(RoutingTable.from_dict(_table(7, f"c{i}")))
        assert d.latest().epoch == "c199"

        monkeypatch.setattr(dispatcher, "LEFT_EPOCH_TTL_S", 0.05)
        time.sleep(0.1)
        assert d.set_table(RoutingTable.from_dict(_table(1, "d")))  # leaving c199 forgets those left long ago
        assert list(d._left_epochs) == ["c199"]
        assert not d.set_table(RoutingTable.from_dict(_table(9, "c199")))
    finally:
        d.close()


def test_a_restarted_controller_answers_a_gateway_of_its_predecessor_at_once(model):
    """The predecessor published a version it never saved: the successor (from the record) reaches the same number
    with another table. A poll from a gateway holding the predecessor's table gets the table, not None after the
    wait, and does not count as acknowledging it."""
    GcsRecord("default").clear()
    args = _args(model)

    async def scenario():
        first = ControllerImpl(args)
        first.registry.bump()  # published; its record save failed
        second = ControllerImpl(args)
        assert second.recovering and second.registry.version == first.registry.version
        old = await first.table()
        table = await second.table(old["version"], "g", 5.0, old["epoch"])  # before its recovery bumps the version
        assert table is not None and table["epoch"] != old["epoch"] and second.acks["g"][0] == -1
        while second.recovering:
            await asyncio.sleep(0.05)
        table = await second.table(table["version"], "g", 0.0, table["epoch"])
        assert await second.table(table["version"], "g", 0.0, table["epoch"]) is None
        assert second.acks["g"][0] == table["version"]
        for task in first._tasks | second._tasks:
            task.cancel()

    asyncio.run(scenario())


def test_a_failure_report_installs_the_table_with_its_completeness(model):
    """A gateway's call to b failed and the controller, which already found b dead, answers the report with a table
    missing b's experts. Installed from the report thread, that table must also clear `complete` (what admits new
    requests) and become the version the gateway acknowledges, as a poll's answer does."""
    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        core = object.__new__(GatewayCore)
        core.controller = _LoopHandle(ctrl, asyncio.get_running_loop())
        d = GrpcDispatcher(on_failure=core._on_failure, insecure=True, transport="unary")
        try:
            _init_poller_state(core, d, ctrl.weights)
            core._install(await ctrl.table())
            assert core.complete.is_set()
            async with ctrl._lock:
                ctrl._mark_failed([ctrl.registry.shards["b"]], "health check failed")  # as the health loop does
            d.suspect("b", report=True)  # the gateway's own call to b failed
            await _until(lambda: not d._reporting, 10, "the failure report answered")
            assert d.latest().version == ctrl.registry.version and d.latest().shards == ("a",)
            assert (core.table_version, core.table_epoch) == (ctrl.registry.version, ctrl.epoch)
            assert not core.complete.is_set()  # b's experts have no live copy: new requests wait
        finally:
            d.close()
            for task in ctrl._tasks:
                task.cancel()

    _with_shards(model, "ab", scenario)


class _AwayHandle:
    """A controller that is away (restarting): each call waits on `loop` for a replica that never comes, as in
    Serve's router, until cancelled. `.result(timeout_s)` raises TimeoutError and leaves it waiting, as Serve's
    does; `.cancel()` ends it, as DeploymentResponse.cancel() takes a call out of the router's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.waiting = loop, set()

    def __getattr__(self, name):
        away = self

        async def wait(*args):
            never = asyncio.Event()
            away.waiting.add(never)
            try:
                await never.wait()
            finally:
                away.waiting.discard(never)

        class Call:
            def __init__(self, future):
                self.future = future

            def result(self, timeout_s=None):
                return self.future.result(timeout=timeout_s)

            def cancel(self):
                self.future.cancel()

        return type("Method", (), {"remote": staticmethod(
            lambda *args: Call(asyncio.run_coroutine_threadsafe(wait(*args), away.loop)))})()


def test_polls_that_time_out_while_the_controller_is_away_do_not_pile_up(monkeypatch):
    """Serve's result(timeout_s) leaves a call that timed out queued for a replica: while the controller was away
    the poller added one more every timeout (each delivered at once when a controller came back), and a failure
    report that timed out stayed queued too. Timed out, a call is now cancelled."""
    from elasticmoe.gateway import deployment

    monkeypatch.setattr(deployment, "CALL_TIMEOUT_S", 0.1)
    monkeypatch.setattr(deployment, "TABLE_WAIT_S", 0.0)
    loop = asyncio.new_event_loop()
    serving = threading.Thread(target=loop.run_forever, daemon=True)
    serving.start()
    d = GrpcDispatcher(insecure=True, transport="unary")
    core = _poller_of(d)
    core.controller, core.stopped, core.gateway_id = _AwayHandle(loop), threading.Event(), "g"
    poller = threading.Thread(target=core._poll_table, daemon=True)
    try:
        poller.start()
        time.sleep(2.0)  # several timeouts, each followed by a new poll
        with pytest.raises(TimeoutError):
            core._on_failure("a")
        time.sleep(0.3)
        assert len(core.controller.waiting) <= 1  # the poll in flight, if any
    finally:
        core.stopped.set()
        poller.join(5)
        loop.call_soon_threadsafe(loop.stop)
        serving.join(5)
        loop.close()
        d.close()
    assert not poller.is_alive()
