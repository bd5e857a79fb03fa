"""A shard's frame listener: accepts frame connections (rpc.frame_socket) beside its gRPC server, mTLS as the gRPC
servers (rpc.tls: the release's CA, client certificates required).

A reply with id 0 and RESOURCE_EXHAUSTED, then the end of the connection: the listener refused the connection."""

from __future__ import annotations

import atexit
import logging
import socket
import ssl
import threading
import time
import weakref
from typing import Callable, Iterator

import grpc

from elasticmoe.rpc import frame_socket, frames, tls
from elasticmoe.rpc.frame_socket import FrameReader, hard_close, keepalive, send_parts, send_timeout, shutdown
from elasticmoe.rpc.options import MAX_MESSAGE_BYTES
from elasticmoe.rpc.tls_socket import SerialTLS

log = logging.getLogger(__name__)
Put = Callable[[list], None]  # takes one reply frame as a list of buffers (frames.reply_parts)
HANDSHAKE_S = 10.0
EXIT_WAIT_S = 5.0  # at interpreter exit, how long the open listeners' frames in progress may take to finish
REFUSE_LINGER_S = 2.0  # how long a refused connection's client may take to read the refusal and close
REFUSE_LINGERING = 8  # refused connections lingering at once, at most (each holds a thread); more close at once
ACCEPT_RETRY_S = 0.1  # a failed accept (no descriptor free: EMFILE) is tried again after this long
_CHUNK = 64 << 10


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


class FrameListener:
    """Accepts frame connections (mTLS; plaintext when `insecure`): each connection's request frames (frames.Request,
    or FrameError for one that cannot be read) go to `serve(frames, put)`; put() writes a reply at once.
    A bad length prefix closes that connection only. At most `max_conns` connections at once, and at most
    `max_handshakes` in their TLS handshake (each has HANDSHAKE_S): a new one cuts the oldest, so clients that open TCP
    and never finish TLS hold neither threads nor descriptors beyond that, and a real client's handshake gets in."""

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
        threading.Thread(target=self._accept, name=f"frames-{self.port}", daemon=True).start()

    def _context(self) -> ssl.SSLContext:
        """The server context, rebuilt when the TLS files change (a renewed certificate, without a restart); files
        that make none (caught mid-rotation) leave the current one in use, as tls.server_credentials does."""
        try:
            stamp = self.files.stamp()
            if self._ctx is None or stamp != self._stamp:
                self._ctx, self._stamp = tls.server_ssl_context(self.files), stamp
        except (OSError, ValueError) as e:
            if self._ctx is None:
                raise
            log.warning("frame listener %d: cannot reload %s: %s", self.port, self.files.cert, e)
        return self._ctx

    def _accept(self) -> None:
        failing = False
        while True:
            try:
                conn, _ = self.sock.accept()
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
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(conn)  # a gateway whose host vanished frees its place within a minute, not hours
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

    def _cut_oldest_opening(self) -> None:
        """(Under the lock.) End the connection longest in its handshake (its thread sees the end and returns)."""
        oldest = min(self._opening, key=self._opening.__getitem__)
        del self._opening[oldest]
        shutdown(oldest)  # a raw socket already wrapped is detached: _wrap, not finding it, closes the TLS one
        log.info("frame listener %d: %d connections in their TLS handshake: the oldest cut", self.port,
                 self.max_handshakes)

    def _open(self, conn: socket.socket) -> socket.socket | None:
        """The TLS handshake (client certificate of the CA required); None (closed) when it fails or the listener
        closes meanwhile."""
        if self.insecure:
            return conn
        try:
            conn.settimeout(HANDSHAKE_S)
            conn = self._wrap(conn)
            conn.do_handshake()
            conn.settimeout(None)
            return conn
        except (OSError, ValueError) as e:
            log.info("frame listener %d: TLS handshake refused: %s", self.port, e)
            with self._lock:
                self._opening.pop(conn, None)
            hard_close(conn)
            return None

    def _wrap(self, raw: socket.socket) -> ssl.SSLSocket:
        """raw as a TLS socket, handshake not done, in place of raw among those close() cuts (raw is detached now:
        cutting it would no longer reach the connection)."""
        conn = self._context().wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            accepted = self._opening.pop(raw, None)
            closed = self.closed or accepted is None  # close() came between (it cut raw, too late), or raw was cut
            if not closed:
                self._opening[conn] = accepted
        if closed:
            hard_close(conn)
            raise OSError("frame listener closed, or the connection cut for a newer handshake")
        return conn

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

    def _refuse(self, conn: socket.socket) -> None:
        """Answer 'shard busy' (id 0), end the writing side, then read and drop what the client sends until it closes
        (up to REFUSE_LINGER_S): closing at once would answer the frames it wrote meanwhile with a reset, and its
        write or read would fail as a broken connection (a dead shard) before it read the refusal. At most
        REFUSE_LINGERING linger at once (a flood of connections must not make threads without bound): the others
        close once the refusal is written."""
        with self._lock:
            if self.closed:
                hard_close(conn)
                return
            linger = len(self._refusing) < REFUSE_LINGERING
            if linger:
                self._refusing.add(conn)
        try:
            send_parts(conn, frames.reply_parts(0, code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                                error=f"{frames.BUSY}: {self.max_conns} frame connections open"))
            socket.socket.shutdown(conn, socket.SHUT_WR)  # the fd's own (a TLS socket's would want an unwrap)
            if not linger:
                return
            conn.settimeout(REFUSE_LINGER_S)
            end = time.monotonic() + REFUSE_LINGER_S
            while conn.recv(_CHUNK) and time.monotonic() < end:
                pass
        except (OSError, ValueError):
            pass  # gone, cut by close(), or still sending after REFUSE_LINGER_S
        finally:
            with self._lock:
                self._refusing.discard(conn)
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
