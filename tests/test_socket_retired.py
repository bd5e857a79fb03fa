"""A socket connection taken out of use (retain: its shard left the table; renewed TLS files) with a call still in
flight: the call's answer is read by the caller waiting for it, as soon as a current connection's, not by the
connection's own thread, which parks for PARK_S after a caller's read (it came up to ~1 s late, and the dispatcher
may hedge such a call for nothing). Real in-process shards over mTLS; the answer held with threading.Event hooks."""

from __future__ import annotations

import threading
import time

import pytest

from elasticmoe.gateway.socket_reading import PARK_S
from elasticmoe.gateway.socket_transport import SocketTransport
from tests.shard_util import _req, files, halves  # noqa: F401


def _hold_next_answer(servicer) -> tuple[threading.Event, threading.Event, threading.Event]:
    """(armed, held, release): once `armed` is set, the shard computes its next frame and holds the answer (`held`
    set) until `release` is set; the frames before and after are answered as usual."""
    frame, armed, held, release = servicer._frame, threading.Event(), threading.Event(), threading.Event()

    def holding(req, put):
        if not armed.is_set():
            return frame(req, put)
        armed.clear()

        def later(parts):
            held.set()
            release.wait(10)
            put(parts)
        return frame(req, later)
    servicer._frame = holding
    return armed, held, release


@pytest.mark.parametrize("how", ["current", "retain", "renewed"])
def test_an_in_flight_answer_on_a_retired_connection_is_read_by_its_caller_at_once(files, halves, how):  # noqa: F811
    """Callers read the connection's answers for 2 * PARK_S (its thread parks meanwhile); a call goes out, its
    answer held by the shard; the connection is retired (or not: "current"); the answer is let go and the caller
    waits: the caller's own thread reads it (it was the connection's thread, once parked: it took 0.5-1 s). The
    test holds the connection's read token from the callers' reads on (reentrant: its own waits still take it), so
    the connection's thread, awake again once PARK_S has passed on a loaded machine, cannot take the answer first;
    a wait that skipped retired connections reads nothing and the call is not answered (a wall-clock bound of
    PARK_S / 2 stood for this before)."""
    layer, address = halves.layers[0], halves.addresses[0]
    armed, held, release = _hold_next_answer(halves.servicers[0])
    t = SocketTransport()
    try:
        end = time.monotonic() + 2 * PARK_S
        while time.monotonic() < end:  # the caller reads (result() reads on its thread): the connection's parks
            assert t.send(address, lambda: _req(files, layer), 10).result(timeout=10).output.data
        conn = t._conns[address]
        conn._token.acquire()
        armed.set()
        call = t.send(address, lambda: _req(files, layer, seed=1), 10)
        assert held.wait(10), "the shard never computed the call"
        if how == "retain":
            t.retain([])  # the table dropped the shard
        elif how == "renewed":
            t.renewal.due = t.renewal.changed = lambda: True  # as tls.Renewal says after the files changed
            assert t.send(address, lambda: _req(files, layer, seed=2), 10).result(timeout=10).output.data
            del t.renewal.due, t.renewal.changed
        assert conn.retired == (how != "current") and not call.done()
        readers: list[str] = []
        call.add_done_callback(lambda _: readers.append(threading.current_thread().name))
        release.set()
        t.wait([call], 5)
        conn._token.release()
        assert call.done() and call.result(timeout=0).output.data
        assert readers == [threading.current_thread().name], readers  # not f"frames-{address}"
    finally:
        release.set()
        t.close()
