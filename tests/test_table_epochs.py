"""Routing-table versions across controller restarts: a gateway refuses a stale answer of the controller it follows
and obeys a restarted one (whose versions start over without its GCS record, or repeat one it never saved)."""

from __future__ import annotations

import asyncio
import threading

from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.gateway.deployment import GatewayCore
from elasticmoe.gateway.dispatcher import GrpcDispatcher, RoutingTable
from tests.controller_util import ControllerImpl, _args
from tests.controller_util import model  # noqa: F401 - a fixture


def _table(version: int, epoch: str, shard: str = "a") -> dict:
    return {"version": version, "epoch": epoch, "complete": True, "layers": {1: [[(0, 1.0)], [(0, 1.0)]]},
            "shards": [{"id": shard, "address": "127.0.0.1:1", "position": 0}]}


def _poller_of(dispatcher: GrpcDispatcher) -> GatewayCore:
    """A GatewayCore's table state around a real dispatcher (what its poller's _install touches)."""
    core = object.__new__(GatewayCore)
    core.dispatcher, core.complete, core.table_version, core.table_epoch = dispatcher, threading.Event(), -1, None
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
