"""A gateway running for weeks sees expert shard replicas come and go: what it keeps per shard id or address must
go with them (real in-process shards over real gRPC and sockets, started and stopped one after another)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.model.experts import ExpertStore
from tests.shard_util import E, Shards, _inputs, _reference, files  # noqa: F401

REPLICAS = 20  # each replaces the one before it, at a new address and with a new shard id


def _table(version: int, shards: list[dict], layers: list[int]) -> RoutingTable:
    """Every expert of every layer has one copy per shard, equal shares."""
    experts = [[(s, 1.0 / len(shards)) for s in range(len(shards))] for _ in range(E)]
    return RoutingTable.from_dict({"version": version, "layers": {l: experts for l in layers}, "shards": shards})


@contextlib.contextmanager
def _churned(files, transport: str):  # noqa: F811
    """A dispatcher that has routed through REPLICAS shard replicas in turn, each replacing the one before it (the
    gone one is still in the next table: its calls fail and fail over to the new one); yielded still open."""
    layers = files.spec.moe.moe_layers
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(l, e) for l in layers for e in range(E)])
    inputs = _inputs(files)
    ref = _reference(files, layers[0], *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=5)
    servers = []
    try:
        for i in range(REPLICAS):
            server, _, port = start_server(store, f"r{i}")
            servers.append(server)
            shards = [{"id": f"r{i}", "address": f"127.0.0.1:{port}"}]
            if i:
                servers[i - 1].stop(None).wait(10)
                shards.insert(0, last)
            last = shards[-1]
            d.set_table(_table(i + 1, shards, layers))
            d.begin_step()  # the engine's step boundary installs it
            torch.testing.assert_close(d.dispatch(layers[0], *inputs).wait(), ref, rtol=1e-5, atol=1e-6)
        assert d.failovers >= REPLICAS - 1  # each gone replica was met, and left (suspected) by the failover
        yield d
    finally:
        d.close()
        for s in servers:
            s.stop(None).wait(10)


def test_shard_ids_coming_and_going_leave_nothing_behind_in_the_dispatcher(files):  # noqa: F811
    with _churned(files, "socket") as d:
        held = {"suspects": len(d.suspects), "shard_tokens": len(d.shard_tokens)}
        assert all(n <= 2 for n in held.values()), held  # the last table's two shards at most, not every one seen


@pytest.mark.parametrize("transport", ["unary", "stream", "socket"])
def test_addresses_coming_and_going_leave_no_channels_or_connections_behind(files, transport):  # noqa: F811
    with _churned(files, transport) as d:
        t = d.transport
        held = {"channels": len(t._stubs), "limits": len(t._limits)}
        for name in ("_conns", "_streams"):  # socket, stream
            if hasattr(t, name):
                held[name] = len(getattr(t, name))
        assert all(n <= 2 for n in held.values()), held  # the last table's two addresses at most
        layer, inputs = files.spec.moe.moe_layers[0], _inputs(files, 1)
        torch.testing.assert_close(d.dispatch(layer, *inputs).wait(), _reference(files, layer, *inputs),
                                   rtol=1e-5, atol=1e-6)  # the live replica is still reached


def test_a_late_retain_from_another_thread_keeps_the_installed_tables_addresses(files):  # noqa: F811
    """Installing a table hands the transport the addresses to keep, outside the dispatcher's lock. A table poll
    that took its addresses before the engine installed newer tables must not close the newer shards' channels when
    its retain runs last (their calls in flight would end CANCELLED: a shard reported failed while healthy)."""
    shards = Shards(files, [list(range(E))] * 3)
    layer, inputs = shards.layers[0], _inputs(files)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport="unary", timeout_s=5)
    real = d.transport.retain
    reading, installed = threading.Event(), threading.Event()

    def slow_retain(addresses):  # the poller's retain, descheduled after it read the tables
        if threading.current_thread().name == "table-poller":
            reading.set()
            installed.wait(1.0)  # until the newer tables are in use (1 s: this thread holds them off meanwhile)
        real(addresses)
    d.transport.retain = slow_retain
    try:
        d.set_table(shards.table({e: [0] for e in range(E)}, 1, alive=[0]))
        torch.testing.assert_close(d.dispatch(layer, *inputs).wait(), ref, rtol=1e-5, atol=1e-6)
        poller = threading.Thread(target=d.set_table, args=(shards.table({e: [1] for e in range(E)}, 2, alive=[1]),),
                                  name="table-poller")
        poller.start()
        assert reading.wait(10)  # its addresses (shards 0 and 1) read; its retain not run yet
        d.begin_step()  # installs shard 1's table
        d.set_table(shards.table({e: [2] for e in range(E)}, 3, alive=[2]))
        d.begin_step()  # installs shard 2's table
        torch.testing.assert_close(d.dispatch(layer, *inputs).wait(), ref, rtol=1e-5, atol=1e-6)
        installed.set()  # the poller's retain runs now, after all of the above, unless it had to run before
        poller.join(10)
        assert shards.addresses[2] in d.transport._stubs, list(d.transport._stubs)
        assert set(d.transport._stubs) == {shards.addresses[2]}
    finally:
        d.close()
        shards.close()


def _reporters_of(make) -> tuple[object, list[threading.Thread]]:
    """make()'s result and the failure-reports threads (found by name in threading.enumerate()) it started."""
    before = set(threading.enumerate())
    made = make()
    return made, [t for t in threading.enumerate() if t not in before and t.name.startswith("failure-reports")]


def _ended(threads: list[threading.Thread], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(t in threading.enumerate() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(t in threading.enumerate() for t in threads)


def test_closing_a_dispatcher_ends_its_failure_reports_thread():
    """Each dispatcher's thread that reports failed shards to the controller was never stopped: every closed one
    (a gateway replica whose start-up failed) left an idle thread behind for good. close() now ends it."""
    def make():
        return [GrpcDispatcher(insecure=True, transport="unary", on_failure=lambda sid: None) for _ in range(3)]
    dispatchers, threads = _reporters_of(make)
    assert len(threads) == 3 and len({t.name for t in threads}) == 3  # one each, told apart by name
    for d in dispatchers:
        d.close()
    assert _ended(threads)


def test_a_report_running_when_its_dispatcher_closes_ends_with_it():
    """close() does not wait for a report in progress (a slow controller); the thread ends once it returns, and
    neither its answer nor a report queued behind it reaches the closed dispatcher. The report is held up to 60 s
    (a close that waited for it would take that); close() gets 20 s, room for a loaded CI host."""
    started, release, heard = threading.Event(), threading.Event(), []
    answer = _table(7, [{"id": "b", "address": "127.0.0.1:1", "position": 0}], [1])

    def on_failure(shard_id):
        heard.append(shard_id)
        started.set()
        release.wait(60)
        return answer

    d, threads = _reporters_of(lambda: GrpcDispatcher(insecure=True, transport="unary", on_failure=on_failure))
    assert len(threads) == 1
    try:
        d.suspect("a", report=True)
        assert started.wait(10)
        d.suspect("c", report=True)  # queued behind a's report
        t0 = time.monotonic()
        d.close()
        assert time.monotonic() - t0 < 20.0 and threads[0].is_alive()
        d.suspect("e", report=True)  # after close: not reported
    finally:
        release.set()
    assert _ended(threads)
    assert heard == ["a"] and d.latest() is None
