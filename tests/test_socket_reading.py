"""Who reads the socket transport's answers: a caller waiting in SocketTransport.wait reads them on its own thread
(the dispatcher's step does), the connection's thread when nobody waits that way; faults and deadlines end such a
wait at once; callers and connection threads reading side by side each get their own answers. Also the reads that
do not wait (FrameReader.step(block=False), SerialTLS.recv_nowait / pending) this rests on."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.gateway import socket_reading
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.tls_socket import SerialTLS
from tests.shard_util import E, _reference, files  # noqa: F401
from tests.shard_util import _req, halves  # noqa: F401 - halves: two shards, each half the experts
from tests.test_tls_socket import pair as tls_pair  # noqa: F401


def _resolver(fut: cf.Future) -> dict:
    """Records the thread that resolves fut (its done callbacks run there). A future already resolved when it is
    watched runs the callback at once on the watching thread: seen["early"] says so (its answer came back while the
    caller was still in send, which reads nothing: another thread read it; seen once on a loaded CI machine)."""
    seen: dict = {}
    adding = threading.local()

    def record(_) -> None:
        seen.update(thread=threading.current_thread(), early=getattr(adding, "on", False))

    adding.on = True
    fut.add_done_callback(record)
    adding.on = False
    return seen


def _read_by_the_connection(seen: dict) -> bool:
    return seen["early"] or seen["thread"].name.startswith("frames-")


def _wait_all(t: SocketTransport, futs: list[cf.Future], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while (undone := [f for f in futs if not f.done()]) and time.monotonic() < end:
        t.wait(undone, end - time.monotonic())


def test_a_waiting_caller_reads_its_answers_and_the_connection_thread_reads_the_rest(files, halves):  # noqa: F811
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        first = t.send(address, lambda: _req(files, layer), 5)  # nobody reads: concurrent.futures.wait only waits
        seen = _resolver(first)
        assert cf.wait([first], 10).done and first.result().output.data
        assert _read_by_the_connection(seen), seen
        # The connection's thread reads while no caller has for PARK_S: on a loaded machine (a caller descheduled
        # between its send and its wait, or a slow reference below) it may take an answer first, as it may. Holding
        # the read token here (reentrant: this thread's own waits still take it) keeps it out for the loop.
        token = t._conns[address]._token
        token.acquire()
        for i in range(6):  # waited for through the transport, or on the Future: resolved on this very thread
            fut = t.send(address, lambda: _req(files, layer, seed=i), 30)  # 5 s ran out at load ~25
            seen = _resolver(fut)
            if i % 2:
                fut.result(timeout=10)
            else:
                _wait_all(t, [fut], 10)
            assert fut.done() and seen["thread"] is threading.current_thread()
            req = _req(files, layer, seed=i)
            want = _reference(files, layer, req.hidden, req.topk_ids.long(), req.topk_weights)
            torch.testing.assert_close(decode_tensor(fut.result().output), want.double(), rtol=1e-5, atol=1e-6)
        token.release()
        time.sleep(2 * socket_reading.PARK_S)  # no caller reads any more: the connection's thread is back
        late = t.send(address, lambda: _req(files, layer), 5)
        seen = _resolver(late)
        assert cf.wait([late], 10).done and late.result().output.data and _read_by_the_connection(seen), seen
    finally:
        t.close()


def test_a_callback_run_by_a_reading_caller_may_wait_on_another_call(files, halves):  # noqa: F811
    """The reading caller holds the connection's read token while it runs the answers' callbacks; one of them
    waiting on another call of the same connection reads that answer too (the token is reentrant), no deadlock."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        halves.servicers[0].faults.run_delay_s = 0.3  # the second answer comes while the first one's callback waits
        first = t.send(address, lambda: _req(files, layer, seed=1), 10)
        second = t.send(address, lambda: _req(files, layer, seed=2), 10)
        inner: dict = {}
        first.add_done_callback(lambda _: inner.update(got=second.result(timeout=10)))
        t0 = time.perf_counter()
        _wait_all(t, [first], 10)
        assert first.result().output.data and inner["got"].output.data and second.done()
        assert time.perf_counter() - t0 < 5.0
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_a_dead_shard_ends_the_wait_at_once_and_the_waiter_sees_it(files, halves):  # noqa: F811
    """The shard stops while this thread waits in SocketTransport.wait for three slow calls: the wait reads the end
    of stream itself and fails them all (UNAVAILABLE), long before the calls' delay (10 s) or deadline (the bound
    leaves a loaded machine room: 2 s against a 5 s delay was tight)."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        halves.servicers[0].faults.run_delay_s = 10.0
        pending = [t.send(address, lambda: _req(files, layer, seed=i), 30) for i in range(3)]
        seen = [_resolver(f) for f in pending]
        stopper = threading.Timer(0.3, lambda: halves.servers[0].stop(None))
        stopper.start()
        t0 = time.perf_counter()
        _wait_all(t, pending, 20)
        took = time.perf_counter() - t0
        stopper.join()
        assert all(f.done() for f in pending) and took < 6.0, took
        for f, s in zip(pending, seen):
            assert f.exception().code() == grpc.StatusCode.UNAVAILABLE
            assert s["thread"] is threading.current_thread()
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_a_deadline_ends_the_wait_and_the_connection_survives(files, halves):  # noqa: F811
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        conn = t._conns[address]
        halves.servicers[0].faults.run_delay_s = 10.0
        fut = t.send(address, lambda: _req(files, layer, seed=1), 0.2)
        t0 = time.perf_counter()
        _wait_all(t, [fut], 15)
        assert fut.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # its deadline, a sweep grain and one wait slice (0.26 s), with room for a loaded machine: not the answer's 10 s
        assert time.perf_counter() - t0 < 5.0
        halves.servicers[0].faults.run_delay_s = 0.0
        ok = t.send(address, lambda: _req(files, layer, seed=2), 30)  # behind the late one (10 s) on the shard
        _wait_all(t, [ok], 30)  # the late answer is read and dropped on the way
        assert ok.result().output.data and t._conns[address] is conn and not conn.dead and not conn.pending
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_result_and_exception_time_out_after_their_timeout_once(files, halves):  # noqa: F811
    """Future.result(timeout) and exception(timeout) on a socket call still running raise TimeoutError after
    `timeout`, not twice that (reading the answers for `timeout`, then waiting on the Future for `timeout` more).
    A 3 s timeout: 1 s with a 1.8 s bound left a loaded machine too little room."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        halves.servicers[0].faults.run_delay_s = 15.0
        fut = t.send(address, lambda: _req(files, layer, seed=1), 30)
        for ask in (fut.result, fut.exception):
            t0 = time.perf_counter()
            with pytest.raises(cf.TimeoutError):
                ask(timeout=3.0)
            took = time.perf_counter() - t0
            assert 3.0 <= took < 5.5, took  # not twice the timeout (6 s), with room for a loaded machine
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_callers_and_connection_threads_reading_side_by_side_get_their_own_answers(files, halves):  # noqa: F811
    """Six threads wait through the transport (they take the read tokens from each other) and two only on their
    futures, calls of different sizes to both shards over mTLS: every answer is its own request's."""
    layer = halves.layers[0]
    t = SocketTransport()
    holders = [range(E // 2), range(E // 2, E)]

    def one(i: int) -> None:
        shard = i % 2
        req = _req(files, layer, 1 + i % 24, seed=i)
        req = req._replace(topk_ids=(req.topk_ids + shard * (E // 2)).to(torch.int32))
        assert set(req.topk_ids.unique().tolist()) <= set(holders[shard])
        fut = t.send(halves.addresses[shard], lambda: req, 10)
        if i % 4 == 3:
            got = fut.result(timeout=20)
        else:
            _wait_all(t, [fut], 20)
            got = fut.result(timeout=0)
        want = _reference(files, layer, req.hidden, req.topk_ids.long(), req.topk_weights)
        torch.testing.assert_close(decode_tensor(got.output), want.double(), rtol=1e-5, atol=1e-6)

    try:
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(96)))
        assert sorted(t._conns) == sorted(halves.addresses) and not any(c.pending for c in t._conns.values())
        assert all(isinstance(c.sock, SerialTLS) for c in t._conns.values())
    finally:
        t.close()


def test_frame_reader_reads_without_waiting():
    a, b = socket.socketpair()
    try:
        reader = frame_socket.FrameReader(a)
        with pytest.raises(BlockingIOError):
            reader.step(block=False)
        wire = frames.encode_reply(9, torch.arange(6, dtype=torch.float32).view(2, 3), [4], 7, 1)
        b.sendall(wire[:20])
        assert reader.step(block=False) == []  # part of a frame: read, nothing whole yet
        with pytest.raises(BlockingIOError):
            reader.step(block=False)
        b.sendall(wire[20:] + wire)  # the rest, then a second frame whole
        got = reader.step(block=False)
        got += [] if len(got) == 2 else reader.step(block=False)
        assert [frames.decode_reply(g).id for g in got] == [9, 9] and bytes(got[0]) == wire
        b.shutdown(socket.SHUT_WR)
        assert reader.step(block=False) is None  # a clean end of stream
    finally:
        a.close()
        b.close()


def test_serial_tls_reads_without_waiting_and_tells_what_it_holds(tls_pair):  # noqa: F811
    ours, peer = tls_pair
    with pytest.raises(BlockingIOError):
        ours.recv_nowait(memoryview(bytearray(16)))
    assert ours.pending() == 0
    peer.sendall(b"0123456789")
    time.sleep(0.1)
    buf = bytearray(4)
    assert ours.recv_nowait(memoryview(buf)) == 4 and bytes(buf) == b"0123"
    assert ours.pending() == 6  # decrypted and waiting in the SSL object, where poll() cannot see it
    rest = bytearray(16)
    assert ours.recv_nowait(memoryview(rest)) == 6 and bytes(rest[:6]) == b"456789"
    with pytest.raises(BlockingIOError):
        ours.recv_nowait(memoryview(rest))


def test_the_connection_thread_stays_asleep_while_a_caller_reads(files, halves):  # noqa: F811
    """60 back-to-back calls waited for through the transport: the connection's own thread wakes about twice a second
    (each wake-up takes the GIL from the engine thread), not once per answer. A count of calls, not 1.5 s of them
    (a loaded machine made 34 where 50 were asked for), the bound scaled by the time they took."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        _wait_all(t, [t.send(address, lambda: _req(files, layer), 5)], 10)
        conn, calls = t._conns[address], 60
        before, t0 = conn.wakeups, time.monotonic()
        for i in range(calls):
            _wait_all(t, [t.send(address, lambda: _req(files, layer, seed=i), 5)], 10)
        took, woke = time.monotonic() - t0, conn.wakeups - before
        assert woke <= took / socket_reading.PARK_S + 2, (took, woke)  # 60 calls took 61 s at load ~25: no per-call cap
    finally:
        t.close()


def test_a_caller_waiting_while_the_connection_opens_never_reads_a_half_open_one():
    """claim() tells an open connection by its reader, which _run set a statement before the socket: a caller waiting
    for a frame sent while the connection opened could take the read token there and read `None.fileno()` (an
    AttributeError out of the engine step). The connection thread is held between the two (a trace hook)."""
    import inspect
    import sys

    from elasticmoe.gateway.socket_conn import _Conn

    ours, theirs = socket.socketpair()
    may_open, paused, go = threading.Event(), threading.Event(), threading.Event()
    lines, first = inspect.getsourcelines(_Conn._run)
    # the later of the two statements that publish the open socket: the thread stops with one done, not the other
    at = first + max(i for i, line in enumerate(lines)
                     if "self._backlog = sock" in line or "self._reader = frame_socket.FrameReader(sock)" in line)

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == at:
            paused.set()
            go.wait(10)
        return local

    def opener():
        may_open.wait(10)
        return ours, 0
    t = SocketTransport(insecure=True)
    threading.settrace(lambda frame, event, arg: local if frame.f_code is _Conn._run.__code__ else None)
    try:
        conn = t._conns["127.0.0.1:1"] = _Conn("127.0.0.1:1", opener)
    finally:
        threading.settrace(None)
    try:
        fut = cf.Future()
        assert conn.submit(7, [b"x"], fut)  # taken into the backlog while the connection opens
        may_open.set()
        assert paused.wait(2)  # held between publishing the socket and its reader
        t.wait([fut], 0.2)  # reads nothing (no answer comes): must neither raise nor claim a half-open connection
        assert not fut.done()
    finally:
        go.set()
        t.close()
        theirs.close()
