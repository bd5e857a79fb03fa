"""The socket transport: RunExpertsStream's frames on one plain TCP (mTLS) connection per shard, no gRPC on the path."""

from __future__ import annotations

import itertools
import logging
import math
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from typing import Callable

import grpc

from elasticmoe.gateway.transport import Build, Deadlines, Multiplexed, TransportError, _Channels, send_multiplexed
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frame_socket, frames, tls

log = logging.getLogger(__name__)
CONNECT_S = 5.0  # Health (for the frame port), TCP connect and TLS handshake, each
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


class _Call(Future):
    """A call's Future: result() and exception() first read the connection themselves when no one else is reading
    it (the answer wakes this thread, not a reader thread that then wakes it); any other wait (done callbacks,
    concurrent.futures.wait / as_completed, polling done()) puts the connection's thread in charge of reading."""

    conn: "_Conn | None" = None
    deadline = float("inf")  # monotonic: the call's own deadline (Deadlines fails it then)

    def __init__(self):
        super().__init__()
        self._waiters = _Waiters(self)  # concurrent.futures.wait and as_completed install their waiters here

    def add_done_callback(self, fn) -> None:
        self._summon()
        super().add_done_callback(fn)

    def done(self) -> bool:
        """As Future.done; a caller polling it gets its answer read by the connection's thread."""
        self._summon()
        return super().done()

    def _summon(self) -> None:
        if self.conn is not None and not Future.done(self):
            self.conn.summon()

    def result(self, timeout: float | None = None):
        return super().result(self._lead(timeout))

    def exception(self, timeout: float | None = None):
        return super().exception(self._lead(timeout))

    def _lead(self, timeout: float | None) -> float | None:
        """Read while this call is pending and the reader role is free; returns what is left of `timeout`."""
        if self.conn is None or Future.done(self):
            return timeout
        end = None if timeout is None else time.monotonic() + timeout
        self.conn.lead(self, self.deadline if end is None else min(self.deadline, end))
        return None if end is None else max(0.0, end - time.monotonic())  # Deadlines fails it at its deadline


class _Waiters(list):
    """A Future's waiter list that puts the connection's thread in charge of reading when a waiter is added."""

    def __init__(self, fut: _Call):
        super().__init__()
        self.fut = fut

    def append(self, waiter) -> None:
        self.fut._summon()
        super().append(waiter)


class _Conn(Multiplexed):
    """One connection to a shard's frame listener. Its thread opens it (Health for the port, TCP, TLS) and sends the
    frames submitted meanwhile; afterwards callers write their frames themselves (sendmsg, no thread hop). Answers
    are read by whoever holds the reader role: a caller waiting in _Call.result() when the role is free (leader),
    else the connection's thread: while it is in charge (callers wait by callbacks, concurrent.futures.wait or
    done(); it then blocks in recv, as a plain reader thread) and to read the calls pending when it opened or that a
    leader left with no caller waiting to take over. Any failure (cannot connect, broken, a reply that cannot be
    read) fails every pending call at once and marks it dead; the next send opens a new one."""

    def __init__(self, address: str, opener: Callable[[], socket.socket]):
        super().__init__(address)  # its _lock guards pending, dead, retired, sock, backlog and the reader state
        self.retired = False
        self.sock: socket.socket | None = None
        self._frames: frame_socket.FrameReader | None = None
        self._poll = select.poll()
        self._backlog: list[list] | None = []  # frames submitted while connecting; None once open
        self._send_lock = threading.Lock()  # one frame on the wire at a time
        self._turn = threading.Condition(self._lock)  # the thread waits here for a turn to read
        self._follow = threading.Condition(self._lock)  # callers in result() wait here: for the role or their answer
        self._followers = 0
        self._reading = False  # someone holds the reader role
        self._park = False  # the thread is in charge of reading (until a caller leads)
        self._drain = False  # the thread reads the calls pending now (a leader left them, or they came first)
        self._idle = False  # the thread waits on _turn
        self._refusal: grpc.RpcError | None = None  # the listener refused the connection (id 0 reply)
        threading.Thread(target=self._run, args=(opener,), name=f"frames-{address}", daemon=True).start()

    def submit(self, frame_id: int, parts: list, fut: Future) -> bool:
        """Send a frame (a list of buffers); False when the connection is dead or retired (use a new one)."""
        with self._lock:
            if self.dead or self.retired:
                return False
            self.pending[frame_id] = fut
            if self._backlog is not None:
                self._backlog.append(parts)
                return True
            sock = self.sock
        try:
            with self._send_lock:
                frame_socket.send_parts(sock, parts)
        except OSError as e:
            self.fail(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} broken: {e}"))
        return True

    def summon(self) -> None:
        """Put the thread in charge of reading (a call is waited for by other means than result())."""
        with self._lock:
            if not self._park:
                self._park = True
                if self._idle and not self._reading:
                    self._turn.notify()

    def take(self, frame_id: int) -> Future | None:
        with self._lock:
            fut = self.pending.pop(frame_id, None)
            done = self.retired and not self.pending
        if done:  # retired and every answer in: end it
            self._shut()
        return fut

    def lead(self, fut: Future, until: float) -> None:
        """Read for `fut` while it is pending, until `until` (monotonic): at once if the reader role is free, else
        once the reader (another caller) leaves it, unless the reader resolves `fut` first."""
        with self._lock:
            self._park = False  # callers read their own answers: the thread drains what it has, then rests
            while self._reading and not Future.done(fut) and not self.dead:
                left = until - time.monotonic()
                if left <= 0:
                    return
                self._followers += 1
                self._follow.wait(left)
                self._followers -= 1
            if Future.done(fut) or self.dead or self._frames is None:
                return  # (connecting: the thread reads once it is open)
            self._reading = True
        try:
            while not Future.done(fut) and not self.dead:
                left = until - time.monotonic()
                if left <= 0:
                    return
                if self._frames.buffered() or self._poll.poll(max(1, math.ceil(left * 1000))):
                    self._read_once()
        finally:
            with self._lock:
                self._reading = False
                if self._followers:
                    self._follow.notify()  # the role passes to a caller still waiting
                else:
                    self._drain = bool(self.pending)  # calls waited for otherwise: the thread reads them
                    if self._idle and (self.pending or self.dead or self.retired):
                        self._turn.notify()

    def resolve(self, reply) -> None:
        super().resolve(reply)
        with self._lock:  # (a follower checks its Future and waits under the lock: it cannot miss this)
            if self._followers:
                self._follow.notify_all()

    def _read_once(self) -> bool:
        """One step of the reader (holding the role): resolve the whole frames it brings; False once it ended."""
        try:
            got = self._frames.step()
            if got is None:
                self.fail(self._refusal or TransportError(grpc.StatusCode.UNAVAILABLE,
                                                          f"connection to {self.address} ended"))
                return False
            for buf in got:
                reply = frames.decode_reply(buf)
                if reply.id == 0 and reply.code == _RESOURCE_EXHAUSTED:  # the listener refused the connection
                    self._refusal = TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED, reply.error)
                self.resolve(reply)
            return True
        except OSError as e:
            self.fail(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address}: {e}"))
        except Exception as e:  # noqa: BLE001 - a reply that cannot be read fails the connection's calls
            self.fail(TransportError(grpc.StatusCode.INTERNAL, f"connection to {self.address}: {e}"))
        return False

    def _run(self, opener: Callable[[], socket.socket]) -> None:
        try:
            sock = opener()
        except Exception as e:  # noqa: BLE001 - whatever stops the opening fails the calls waiting for it
            code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            log.info("frames to %s: cannot connect: %s", self.address, e)
            self.fail(TransportError(code if code != grpc.StatusCode.DEADLINE_EXCEEDED else
                                     grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.address}: {e}"))
            return
        self._poll.register(sock, select.POLLIN)
        with self._send_lock:
            with self._lock:
                self.sock, backlog, self._backlog = sock, self._backlog, None
                self._frames = frame_socket.FrameReader(sock)
                self._drain = bool(self.pending)  # callers that came while it opened wait on their Futures
                dead = self.dead
            try:
                for parts in [] if dead else backlog:
                    frame_socket.send_parts(sock, parts)
            except OSError as e:
                self.fail(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} broken: {e}"))
        try:
            self._read()
        finally:
            frame_socket.hard_close(sock)  # shut first: a leader still in recv wakes

    def _read(self) -> None:
        """The thread's turns: read (blocking) while in charge or draining; until the connection ends (dead, or
        retired with every answer in)."""
        while True:
            with self._lock:
                if not self._turn_to_read():
                    break
                self._reading = True
            try:
                while self._read_once():
                    with self._lock:
                        if not self._park and not self.pending:
                            break
            finally:
                with self._lock:
                    self._reading = False
                    if self._followers:
                        self._follow.notify()
        self.fail(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} ended"))

    def _turn_to_read(self) -> bool:
        """(Holding _lock) wait until the thread should read: True; False once the connection has ended."""
        while not self.dead and not (self.retired and not self.pending):
            if not self._reading and (self._park or self._drain):
                self._drain = False
                return True
            self._idle = True
            self._turn.wait()
            self._idle = False
        return False

    def _shut(self) -> None:
        with self._lock:
            sock = self.sock
            self._turn.notify()  # the thread, idle, sees the end
            self._follow.notify_all()
        if sock is not None:
            frame_socket.shutdown(sock)  # a reader wakes with the end of stream

    def fail(self, err: grpc.RpcError) -> None:
        self.fail_pending(err)
        self._shut()

    def retire(self) -> None:
        """No new frames; the calls in flight still get their answers, then it closes."""
        with self._lock:
            self.retired = True
            idle = not self.pending
        if idle:
            self._shut()


class SocketTransport(_Channels):
    """One persistent TCP connection per shard to its frame listener (port from Health, asked at each connect):
    the same frames as StreamTransport's stream, written with sendmsg from the caller's thread and read by one
    thread per connection. Deadlines per request (a late answer is dropped, the connection stays); a broken
    connection fails all its pending calls at once (UNAVAILABLE) and the next send reconnects; renewed TLS files
    (tls.Renewal) retire every connection. mTLS with Python's ssl and the same files; plaintext when `insecure`."""

    def __init__(self, insecure: bool = False, options: list[tuple[str, int]] | None = None):
        super().__init__(insecure, options)
        self._conns: dict[str, _Conn] = {}
        self._ids = itertools.count(1)
        self._deadlines = Deadlines("socket-deadlines")
        self._lock = threading.Lock()
        self._ctx: ssl.SSLContext | None = None

    def _conn(self, address: str) -> _Conn:
        stub, renewed = self.stub(address)
        with self._lock:
            if renewed:
                self._ctx = None
                for c in self._conns.values():
                    c.retire()
                self._conns.clear()
            c = self._conns.get(address)
            if c is None or c.dead or c.retired:
                c = self._conns[address] = _Conn(address, lambda: self._open(address, stub))
            return c

    def _open(self, address: str, stub) -> socket.socket:
        """Health (the frame port), TCP connect, TLS handshake: the connection's socket."""
        port = stub.Health(pb.HealthRequest(), timeout=CONNECT_S).frame_port
        if not port:
            raise ConnectionError(f"shard {address} has no frame listener (Health.frame_port 0)")
        host = address.rsplit(":", 1)[0].strip("[]")
        sock = socket.create_connection((host, port), timeout=CONNECT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            if not self.insecure:
                with self._lock:
                    ctx = self._ctx = self._ctx or tls.client_ssl_context()
                sock = ctx.wrap_socket(sock, server_hostname=tls.SERVER_NAME)
            sock.settimeout(None)
            frame_socket.send_timeout(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        frame_id = next(self._ids)
        fut = _Call()
        fut.deadline = time.monotonic() + timeout_s
        return send_multiplexed(address, frame_id, lambda: frames.request_parts(frame_id, build()),
                                lambda: self._conn(address), self._deadlines, timeout_s, fut)

    def close(self) -> None:
        self._deadlines.close()
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.fail(TransportError(grpc.StatusCode.CANCELLED, "transport closed"))
