"""The socket transport: RunExpertsStream's frames on one plain TCP (mTLS) connection per shard (a Unix socket to a
shard on the same host), no gRPC on the path; a caller waiting for answers reads them on its own thread."""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Callable

from elasticmoe.gateway.multiplex import Deadlines, send_multiplexed
from elasticmoe.gateway.socket_conn import _Conn
from elasticmoe.gateway.socket_reading import _ready
from elasticmoe.gateway.transport import Build, _Channels, closed_error
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frame_socket, frames, tls, unix_socket
from elasticmoe.rpc.tls_socket import SerialTLS

log = logging.getLogger(__name__)
CONNECT_S = 5.0  # Health (for the frame port), TCP connect and TLS handshake, each
WAIT_SLICE_S = 0.01  # a reading caller looks at its futures at least this often (deadlines, other threads)


class _Answer(Future):
    """A socket transport call's Future: waiting on it (result, exception) reads the answers on the waiting thread,
    as SocketTransport.wait does (concurrent.futures.wait and done callbacks do not)."""

    def __init__(self, wait: Callable[[list[Future], float], None]):
        super().__init__()
        self._wait_through = wait

    def result(self, timeout: float | None = None):
        return super().result(self._read_until_done(timeout))

    def exception(self, timeout: float | None = None):
        return super().exception(self._read_until_done(timeout))

    def _read_until_done(self, timeout: float | None) -> float | None:
        """Read until done or `timeout` has passed; what is left of `timeout` (0 once spent; None: no timeout)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            left = 3600.0 if end is None else end - time.monotonic()
            if left <= 0:
                return 0
            self._wait_through([self], left)
        return None if end is None else max(0.0, end - time.monotonic())


class SocketTransport(_Channels):
    """One persistent TCP connection per shard to its frame listener (port from Health, asked at each connect; its
    Unix socket instead where Health names one this process can reach, unless `unix` is False):
    the same frames as StreamTransport's stream, written with sendmsg from the caller's thread and read by the
    thread waiting for them in wait() (else by the connection's own thread). Deadlines per request (a late answer
    is dropped, the connection stays); a broken connection fails all its pending calls at once (UNAVAILABLE) and
    the next send reconnects; renewed TLS files (tls.Renewal) retire every connection. mTLS with Python's ssl and
    the same files; plaintext when `insecure`."""

    ask_limits = False  # Health is asked at each connect (_open)

    def __init__(self, insecure: bool = False, options: list[tuple[str, int]] | None = None, unix: bool = True):
        super().__init__(insecure, options)
        self.unix = unix
        self._conns: dict[str, _Conn] = {}
        self._ids = itertools.count(1)
        self._deadlines = Deadlines("socket-deadlines")
        self._conns_lock = threading.Lock()  # guards _conns, _retired, _ctx (never held with _channels_lock)
        # connections taken out of use (retain, renewed TLS files) while calls were in flight: wait() reads their
        # answers too (their own threads park for socket_reading.PARK_S after a caller's read: up to ~1 s late)
        self._retired: list[_Conn] = []
        self._ctx: ssl.SSLContext | None = None
        self.families: dict[str, str] = {}  # shard address -> its last connection's socket family (AF_UNIX, AF_INET)

    def _conn(self, address: str) -> _Conn:
        c = self._conns.get(address)  # every call's path: the open connection, unless the TLS files are due a look
        if c is not None and not (c.dead or c.retired or self.renewal.due()):
            return c
        stub, renewed = self.stub(address)  # CANCELLED once closed
        with self._conns_lock:
            if self.closed:  # closed since: nothing would close a connection opened now
                # (close sets closed before it takes this lock: it finds the one opened here, or this finds closed)
                raise closed_error()
            if renewed:
                self._ctx = None
                self._retire(list(self._conns.values()))
                self._conns.clear()
            c = self._conns.get(address)
            if c is None or c.dead or c.retired:
                c = self._conns[address] = _Conn(address, lambda: self._open(address, stub))
            return c

    def _retire(self, conns: list[_Conn]) -> None:
        """(Holding _conns_lock.) Retire `conns`: those with calls in flight join _retired until answered."""
        for c in conns:
            c.retire()
        self._retired = [c for c in (*self._retired, *conns) if c.pending]

    def _open(self, address: str, stub) -> tuple[socket.socket | SerialTLS, int]:
        """Health (the frame port, the shard's message limit), connect (to the listener's Unix socket where this
        process can reach it, else TCP), TLS handshake: the connection's socket and that limit (0: not told; an older
        shard)."""
        health = stub.Health(pb.HealthRequest(), timeout=CONNECT_S)
        port, limit = health.frame_port, min(health.max_message_bytes, frames.LIMIT)
        self._limits[address] = limit
        if not port:
            raise ConnectionError(f"shard {address} has no frame listener (Health.frame_port 0)")
        # a shard on this host: no TCP stack in between (ELASTICMOE_FRAME_UNIX=0 switches it off)
        sock = unix_socket.connect(health.frame_unix_path, CONNECT_S) if self.unix else None
        if sock is None:
            host = address.rsplit(":", 1)[0].strip("[]")
            sock = socket.create_connection((host, port), timeout=CONNECT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            frame_socket.keepalive(sock)  # a shard whose host vanished fails its calls within a minute
        self.families[address] = sock.family.name
        try:
            if not self.insecure:
                with self._conns_lock:
                    ctx = self._ctx = self._ctx or tls.client_ssl_context()
                sock = ctx.wrap_socket(sock, server_hostname=tls.SERVER_NAME)
            sock.settimeout(None)
            if isinstance(sock, ssl.SSLSocket):  # the reader and the writers, one SSL call at a time
                return SerialTLS(sock, frame_socket.SEND_TIMEOUT_S), limit
            frame_socket.send_timeout(sock)
        except BaseException:
            sock.close()
            raise
        return sock, limit

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        frame_id = next(self._ids)
        return send_multiplexed(address, frame_id, lambda: frames.request_parts(frame_id, build()),
                                lambda: self._conn(address), self._deadlines, timeout_s, _Answer(self.wait))

    def wait(self, futures: list[Future], timeout_s: float) -> None:
        """Until one of `futures` is done or timeout_s has passed. The answers are read here, on the caller's thread,
        from every connection with calls pending (retired ones too) whose read token it can take (no hand-off from a
        reader thread: a thread wake-up less per answer); the others' threads resolve theirs."""
        end = time.monotonic() + timeout_s
        with self._conns_lock:
            if self._retired:
                self._retired = [c for c in self._retired if c.pending]  # answered (or failed): closed or closing
            conns = [c for c in (*self._conns.values(), *self._retired) if c.pending]
        held: list[_Conn] = []
        try:
            while not any(f.done() for f in futures):
                held += [c for c in conns if c not in held and c.claim()]
                left = end - time.monotonic()
                if left <= 0:
                    return
                if not held:
                    wait_futures(futures, left, FIRST_COMPLETED)
                    return
                by_fd = {c.sock.fileno(): c for c in held}
                slice_s = WAIT_SLICE_S if len(held) == len(conns) else WAIT_SLICE_S / 10  # others' answers too
                ready = [c for c in held if c.buffered()] or [
                    by_fd[fd] for fd in _ready(list(by_fd), min(left, slice_s))]
                for c in ready:
                    if not c.read_ready():  # ended: its calls failed
                        held.remove(c)
                        conns.remove(c)
                        c.release()
        finally:
            for c in held:
                c.release()

    def retain(self, addresses) -> None:
        """Retire the connections to shards at other addresses (their calls in flight still get their answers, then
        each closes), and close their channels (_Channels.retain)."""
        with self._conns_lock:
            self._retire([self._conns.pop(a) for a in list(self._conns) if a not in addresses])
        super().retain(addresses)

    def close(self) -> None:
        """Fail every call in flight CANCELLED and end the connections; a call sent after (or while it closes) fails
        CANCELLED unsent: no connection opens once closed (it used to, and nothing ever closed it)."""
        self._deadlines.close(closed_error())  # retired connections' calls too
        self.close_channels()  # closed: from now on _conn opens nothing
        with self._conns_lock:
            conns, self._conns, self._retired = list(self._conns.values()), {}, []  # the retired: failed above
        for c in conns:
            c.fail(closed_error())
