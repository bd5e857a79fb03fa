"""A shard's stop: the frame listener's close() and ShardServer.stop() Events wait for the frames being computed (a
daemon thread still inside torch when the interpreter finalizes aborts the process), and a process exiting with
its listener open lets the frame in progress finish (rc 0, its last line printed) instead of being cut mid-op."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
import torch

from elasticmoe.gateway.transport import make_transport
from elasticmoe.rpc import frame_gate, frame_listener, frame_socket, frames, tls
from elasticmoe.rpc.frames import ExpertRequest
from tests.shard_util import E, Shards, _inputs, files  # noqa: F401

_REQ = ExpertRequest(0, torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))


def _slow_serve(started: threading.Event, finished: threading.Event, release: threading.Event, seconds: float):
    """serve(): for each frame, small torch ops (each releases and retakes the GIL) until `release` is set and for
    `seconds` after, then the echo. Held by an Event, not for a wall-clock time: on a loaded machine the frame's
    time could run out before the test looked."""
    def serve(requests, put) -> None:
        for r in requests:
            started.set()
            x = torch.randn(64, 64)
            while not release.is_set():
                x = x[torch.randperm(64)]
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                x = x[torch.randperm(64)]
            finished.set()
            put(frames.reply_parts(r.id, r.hidden))
    return serve


def test_close_event_waits_for_the_frame_being_computed():
    started, finished, release = threading.Event(), threading.Event(), threading.Event()
    listener = frame_listener.FrameListener(_slow_serve(started, finished, release, 0.0), "127.0.0.1", [0],
                                            insecure=True)
    client = socket.create_connection(("127.0.0.1", listener.port))
    try:
        frame_socket.send_parts(client, frames.request_parts(7, _REQ))
        assert started.wait(10)
        done = listener.close()
        assert client.recv(1) == b""  # cut at once: the client sees the end before the frame finishes
        assert not done.wait(0.3) and not finished.is_set()  # an Event that did not wait would be set by now
        release.set()
        assert done.wait(10) and finished.is_set()  # set only once the connection's thread has returned
        assert not listener._threads
    finally:
        release.set()
        client.close()


def test_close_event_is_set_at_once_without_connections():
    listener = frame_listener.FrameListener(lambda requests, put: None, "127.0.0.1", [0], insecure=True)
    assert listener.close().wait(2)
    assert listener.close(grace=5).wait(2)  # closed again, nothing open: no grace timer to wait for


def test_closing_again_during_a_grace_cuts_the_connections_at_once():
    """As grpc.Server.stop(None) after stop(grace): the open connections end now, not when the first grace is over
    (they waited it out: a shard's stop(None), a kill's stand-in in the tests, left its frames running)."""
    listener = frame_listener.FrameListener(lambda requests, put: list(requests), "127.0.0.1", [0], insecure=True)
    client = socket.create_connection(("127.0.0.1", listener.port))
    try:
        deadline = time.monotonic() + 5
        while not listener._conns and time.monotonic() < deadline:
            time.sleep(0.01)
        graceful = listener.close(grace=10)
        client.settimeout(0.3)
        with pytest.raises(socket.timeout):
            client.recv(1)  # served during the grace
        client.settimeout(5)
        assert listener.close().wait(5) and client.recv(1) == b""
        assert graceful.wait(1)  # as grpc.Server.stop's: every pending close's Event is set once it has stopped
        assert listener not in frame_listener._open_listeners
    finally:
        client.close()


def test_close_cuts_a_connection_still_in_its_tls_handshake(tmp_path):
    """A peer that connected and has not finished its TLS handshake (stalled, or slow) is cut by close() too: the
    Event does not wait out the handshake's timeout."""
    files = tls.local_ca(tmp_path / "ca")
    listener = frame_listener.FrameListener(lambda requests, put: None, "127.0.0.1", [0], files=files)
    client = socket.create_connection(("127.0.0.1", listener.port))  # no ClientHello ever
    try:
        deadline = time.monotonic() + 5
        while not listener._opening and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # inside the handshake
        t0 = time.monotonic()
        done = listener.close()
        assert done.wait(frame_gate.HANDSHAKE_S / 2), time.monotonic() - t0
        assert not listener._threads and client.recv(1) == b""
    finally:
        client.close()

_EXITING = """
    import socket, sys, threading
    from elasticmoe.rpc import frame_listener, frame_socket, frames
    from tests.test_shard_stop import _REQ, _slow_serve
    started, finished, release = threading.Event(), threading.Event(), threading.Event()
    release.set()  # 1 s of frame from its start, as before (an atexit-released hold hung once at load ~25)
    serve = _slow_serve(started, finished, release, 1.0)
    def serve_and_tell(requests, put):
        serve(requests, put)
        print("finished" if finished.is_set() else "no frame", flush=True)
    listener = frame_listener.FrameListener(serve_and_tell, "127.0.0.1", [0], insecure=True)
    client = socket.create_connection(("127.0.0.1", listener.port))
    frame_socket.send_parts(client, frames.request_parts(7, _REQ))
    assert started.wait(10)
    print("exiting", flush=True)
    sys.exit(0)  # the listener still open, its frame mid-way
"""


@pytest.mark.parametrize("close", ["", "listener.close(grace=30)"])
def test_exiting_with_a_frame_in_progress_finishes_it(close):
    """The connection's thread prints its line once its frame is done and the exit hook cut the connection; a
    daemon thread stopped at finalization never would (and inside torch, aborts the process: rc -6). A listener
    in a close's grace when the process exits is cut and waited for as an open one. (The child's imports alone took
    20-45 s on a loaded machine: its timeout, a hang guard only, is 300 s.)"""
    script = textwrap.dedent(_EXITING).replace('print("exiting"', close + '\nprint("exiting"')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["exiting", "finished"], (out.stdout, out.stderr[-2000:])


def _hold_next_compute(servicer) -> tuple[threading.Event, threading.Event, threading.Event]:
    """(entered, release, ended): the shard's next call (unary, stream or socket frame alike: they all compute through
    _compute) waits once counted (`entered` set) until `release` is set, then computes (`ended` set once it has)."""
    compute, entered, release, ended = servicer._compute, threading.Event(), threading.Event(), threading.Event()

    def held(request, context):
        if entered.is_set():
            return compute(request, context)
        entered.set()
        assert release.wait(30), "never released"
        try:
            return compute(request, context)
        finally:
            ended.set()
    servicer._compute = held
    return entered, release, ended


def _in_flight(files, shards: Shards, t):  # noqa: F811
    """One call answered, then a second one the shard takes and holds: (its pending Future, release, ended), once
    the shard holds it (a wall-clock delay instead raced the stop on a loaded machine: answered before it began,
    or computed past its grace)."""
    req = ExpertRequest(shards.layers[0], *_inputs(files, 0))
    assert t.send(shards.addresses[0], lambda: req, 10).result(timeout=20).output.data
    entered, release, ended = _hold_next_compute(shards.servicers[0])
    pending = t.send(shards.addresses[0], lambda: req, 60)
    assert entered.wait(20), "the shard never took the call"
    return pending, release, ended


@pytest.mark.parametrize("kind", ["socket", "stream"])
def test_shard_stop_event_waits_for_the_frame_being_computed(files, kind):  # noqa: F811
    """ShardServer.stop(None): the caller's pending call fails at once, both transports' frames alike (while its
    frame is still held); the Event is set only once the frame being computed has ended (the listener's connection
    thread or the stream's reading thread)."""
    shards = Shards(files, [list(range(E))])
    t = make_transport(kind, insecure=False)
    release = threading.Event()
    try:
        pending, release, ended = _in_flight(files, shards, t)
        stopped = shards.servers[0].stop(None)
        with pytest.raises(grpc.RpcError):
            pending.result(timeout=20)  # its frame is held: failing at all means before the frame ended
        assert not stopped.wait(0.5) and not ended.is_set()  # an Event that did not wait would be set by now
        release.set()
        assert stopped.wait(20) and ended.is_set()
        assert not shards.servicers[0].readers and not shards.servers[0].listener._threads
    finally:
        release.set()
        t.close()
        shards.close()


class _Releasing:
    """The shard's ShardServer as the replica's `server`: its stop() lets the held call go once the stop has begun."""

    def __init__(self, server, release: threading.Event):
        self.server, self.release = server, release

    def stop(self, grace):
        stopped = self.server.stop(grace)
        self.release.set()
        return stopped


@pytest.mark.parametrize("kind", ["unary", "socket"])
def test_a_stopping_replica_answers_the_call_in_flight_before_it_returns(files, kind, monkeypatch):  # noqa: F811
    """ExpertShard.__del__ stops its server with a grace period for the calls in flight; Serve kills the process
    once __del__ returns, so it must return only after them: it returned at once (stop() only starts stopping), and
    the call in flight was cut by the kill (its gateway failing over) instead of being answered. The kill here is
    stop(None) once __del__ has returned. The call is held until the stop has begun (in flight for sure), then
    computed within a grace long enough for a loaded machine (STOP_GRACE_S, 2 s, was cut there once)."""
    from elasticmoe.experts import deployment
    from tests.test_controller_restart import ShardImpl, _Replica

    monkeypatch.setattr(deployment, "STOP_GRACE_S", 8.0)
    shards = Shards(files, [list(range(E))])
    t = make_transport(kind, insecure=False)
    release = threading.Event()
    try:
        pending, release, ended = _in_flight(files, shards, t)
        assert not pending.done(), "no call in flight when the stop began"
        replica = object.__new__(_Replica)  # not registered: no drain, straight to the server's stop
        replica.shard_id, replica.server, replica.controller = "s0", _Releasing(shards.servers[0], release), None
        replica.registered, replica.stopping, replica._ready_lock = threading.Event(), False, threading.Lock()
        asyncio.run(asyncio.wait_for(ShardImpl.__del__(replica), 30))
        assert release.is_set() and ended.is_set()  # __del__ returned once the held call had been computed
        shards.servers[0].stop(None)  # as Serve's kill: a call still in flight now is cut, its gateway fails over
        # answered before __del__ returned: its answer on its way, taken by the client's thread when it next runs
        # (at once: not always by the time __del__ returns, on a loaded machine)
        assert pending.result(timeout=10).output.data
    finally:
        release.set()
        t.close()
        shards.close()
