"""A shard's frame listener: accepts frame connections (rpc.frame_socket) beside its gRPC server, mTLS as the gRPC
servers (rpc.tls: the release's CA, client certificates required).

A reply with id 0 and RESOURCE_EXHAUSTED, then the end of the connection: the listener refused the connection
(rpc.frame_gate: who gets a connection)."""

from __future__ import annotations

import atexit
import logging
import socket
import threading
import time
import weakref
from typing import Callable, Iterator

from elasticmoe.rpc import frame_socket, frames, tls, unix_socket
from elasticmoe.rpc.frame_gate import ConnectionGate
from elasticmoe.rpc.frame_socket import FrameReader, hard_close, keepalive, send_parts, send_timeout, shutdown
from elasticmoe.rpc.options import MAX_MESSAGE_BYTES
from elasticmoe.rpc.tls_socket import SerialTLS

log = logging.getLogger(__name__)
Put = Callable[[list], None]  # takes one reply frame as a list of buffers (frames.reply_parts)
EXIT_WAIT_S = 5.0  # at interpreter exit, how long the open listeners' frames in progress may take to finish
ACCEPT_RETRY_S = 0.1  # a failed accept (no descriptor free: EMFILE) is tried again after this long


def bind(host: str, ports: list[int]) -> socket.socket:
    """A listening socket on the first of `ports` (0: any) free on host; OSError when none is."""
    err: OSError | None = None
    for port in ports:
        try:
            return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=128)
        except OSError as e:
            err = e
    raise err or OSError(f"no port to bind on {host}")


class FrameListener(ConnectionGate):
    """Accepts frame connections (mTLS; plaintext when `insecure`): each connection's request frames (frames.Request,
    or FrameError for one that cannot be read) go to `serve(frames, put)`; put() writes a reply at once.
    A bad length prefix closes that connection only. At most `max_conns` connections at once, and at most
    `max_handshakes` in their TLS handshake (each has HANDSHAKE_S): a new one cuts the oldest, so clients that open TCP
    and never finish TLS hold neither threads nor descriptors beyond that, and a real client's handshake gets in.
    Beside the TCP port, a Unix socket at `unix_path` ("" where there is none: unix_socket.bind) takes the same
    connections from processes on this host (same TLS, same limits, counted together)."""

    def __init__(self, serve: Callable[[Iterator, Put], None], host: str, ports: list[int], insecure: bool = False,
                 files: tls.TlsFiles | None = None, max_conns: int = 16, max_handshakes: int = 16,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.serve, self.insecure, self.max_conns = serve, insecure, max_conns
        self.max_message_bytes = max_message_bytes  # a longer frame ends its connection (Health announces it)
        self.max_handshakes = max(1, max_handshakes)
        self.files = None if insecure else (files or tls.tls_files())
        self._ctx, self._stamp = None, None
        self.sock = bind(host, ports)
        self.port = self.sock.getsockname()[1]
        self.unix_sock, self.unix_path = unix_socket.bind()
        self._conns: set[socket.socket] = set()  # connections being served (their TLS sockets once open)
        self._opening: dict[socket.socket, float] = {}  # accepted, handshake not done yet -> when accepted
        self._refusing: set[socket.socket] = set()  # refused (over max_conns), until their clients close
        self._threads: set[threading.Thread] = set()  # each connection's thread, until it returns
        self._lock = threading.Lock()
        self.closed = False
        self._cut = False  # set when the connections are cut (at close, or once its grace is over)
        self._closes: list[threading.Event] = []  # each close()'s, until the listener has stopped
        self._timers: list[threading.Timer] = []  # the graceful closes' grace timers
        _open_listeners.add(self)  # until it has stopped (through a close's grace too): the exit hook closes it
        for sock in (self.sock, self.unix_sock):
            if sock is not None:
                threading.Thread(target=self._accept, args=(sock,), name=f"frames-{self.port}", daemon=True).start()

    def _accept(self, listening: socket.socket) -> None:
        tcp = listening.family != socket.AF_UNIX
        failing = False
        while True:
            try:
                conn, _ = listening.accept()
            except OSError as e:
                if self.closed:
                    return
                # out of descriptors (EMFILE: connections piled up on another of the process's ports) or of memory:
                # the connection waits in the backlog. Returning here, as on close, accepted no one ever again
                if not failing:
                    log.warning("frame listener %d: cannot accept (%s); trying again every %.1f s", self.port, e,
                                ACCEPT_RETRY_S)
                failing = True
                time.sleep(ACCEPT_RETRY_S)
                continue
            failing = False
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                keepalive(conn)  # a gateway whose host vanished frees its place within a minute, not hours
            else:
                unix_socket.tune(conn)
            send_timeout(conn)
            thread = threading.Thread(target=self._connection, args=(conn,), name="frames-conn", daemon=True)
            with self._lock:
                if self.closed:  # closed between accept() and here
                    hard_close(conn)
                    return
                self._threads.add(thread)
                if len(self._opening) >= self.max_handshakes:
                    self._cut_oldest_opening()
                self._opening[conn] = time.monotonic()
            thread.start()

    def _connection(self, raw: socket.socket) -> None:
        try:
            self._serve(raw)
        finally:
            with self._lock:
                self._opening.pop(raw, None)
                self._threads.discard(threading.current_thread())

    def _serve(self, raw: socket.socket) -> None:
        conn = self._open(raw)
        if conn is None:
            return
        with self._lock:
            full = len(self._conns) >= self.max_conns
            cut = self._opening.pop(conn, None) is None  # cut for a newer handshake just as its own ended
            refused = self.closed or full or cut
            if not refused:
                self._conns.add(conn)
        if cut:
            hard_close(conn)
            return
        if refused:
            self._refuse(conn)
            return
        # TLS: its writes time out (a blocking SSL write waits for room again and again past SO_SNDTIMEO)
        stream = conn if self.insecure else SerialTLS(conn, frame_socket.SEND_TIMEOUT_S)
        try:
            self.serve(self._frames(stream), self._sender(stream))
        except frames.FrameError as e:
            log.warning("frame listener %d: %s; closing that connection", self.port, e)
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._conns.discard(conn)
            hard_close(conn)

    @staticmethod
    def _sender(conn: socket.socket | SerialTLS) -> Put:
        """put(): the thread with the reply writes it (no hand-off); the first failed write ends the connection."""
        lock, broken = threading.Lock(), [False]

        def put(parts: list) -> None:
            with lock:
                if broken[0]:
                    return
                try:
                    send_parts(conn, parts)
                except OSError:
                    broken[0] = True
                    shutdown(conn)  # the reader wakes with the end of stream
        return put

    def _frames(self, conn: socket.socket | SerialTLS) -> Iterator:
        """The connection's request frames, until it is cut (frames received before the cut are not served)."""
        for buf in FrameReader(conn, limit=self.max_message_bytes).frames():
            if self._cut:
                return
            yield frames.decode_request_or_error(buf)

    def close(self, grace: float | None = None) -> threading.Event:
        """Stop accepting; end every open connection at once (their clients fail their pending calls now), or after
        `grace` seconds (as grpc.Server.stop treats an open stream: it is served until then). The Event is set once
        they are all cut and every connection's thread has returned (a frame being computed is finished and its
        reply dropped), so that nothing of the listener's still runs: a daemon thread inside torch when the
        interpreter finalizes aborts the process. Called again during a grace (None, or a shorter grace): the
        connections are cut that much sooner, as grpc.Server.stop's (they waited out the first grace), and every
        close's Event is set once the listener has stopped."""
        done = threading.Event()
        with self._lock:
            self.closed = True
            conns = bool(self._conns or self._opening or self._refusing)
            threads = list(self._threads)  # all it will have: none is added once closed
            self._closes.append(done)
        hard_close(self.sock)
        if self.unix_sock is not None:
            hard_close(self.unix_sock)
            unix_socket.unlink(self.unix_path)

        def cut() -> None:  # those open when it runs: a graceful close's are still there
            with self._lock:
                self._cut = True
                open_now, self._conns = list(self._conns) + list(self._opening) + list(self._refusing), set()
            for c in open_now:
                shutdown(c)

        def finish() -> None:
            for t in threads:
                t.join()
            self._stopped()
        if grace and conns:
            waiter = threading.Timer(grace, lambda: (cut(), finish()))
            with self._lock:
                self._timers.append(waiter)
        else:
            cut()  # now: the clients see the end before close() returns
            waiter = threading.Thread(target=finish, name=f"frames-{self.port}-close")
        waiter.daemon = True
        waiter.start()
        return done

    def _stopped(self) -> None:
        """Connections cut, their threads returned: every close's Event set, the grace timers still pending dropped,
        the exit hook no longer waits for it."""
        with self._lock:
            closes, self._closes, timers, self._timers = self._closes, [], self._timers, []
        _open_listeners.discard(self)
        for t in timers:
            t.cancel()
        for d in closes:
            d.set()


_open_listeners: "weakref.WeakSet[FrameListener]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close the listeners not yet stopped (open, or in a close's grace: cut now, as close(None) during it) and give
    their frames in progress up to EXIT_WAIT_S to finish (atexit runs before the interpreter finalizes; their daemon
    threads would otherwise be stopped inside torch)."""
    listeners = list(_open_listeners)
    done = [x.close() for x in listeners]
    end = time.monotonic() + EXIT_WAIT_S
    for d in done:
        d.wait(max(0.0, end - time.monotonic()))
