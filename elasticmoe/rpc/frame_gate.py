"""Who gets a frame connection (rpc.frame_listener): the TLS handshake, bounded in time and in number, and the
refusal of a connection over the listener's limit ('shard busy')."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import grpc

from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.frame_socket import hard_close, send_parts, shutdown

log = logging.getLogger("elasticmoe.rpc.frame_listener")  # the listener's: its connections' lines under one name
HANDSHAKE_S = 10.0
REFUSE_LINGER_S = 2.0  # how long a refused connection's client may take to read the refusal and close
REFUSE_LINGERING = 8  # refused connections lingering at once, at most (each holds a thread); more close at once
_CHUNK = 64 << 10


class ConnectionGate:
    """The admission half of a FrameListener, which sets the attributes below: a connection's TLS handshake (each
    within HANDSHAKE_S, at most `max_handshakes` at once: a new one cuts the oldest) and the refusal of one over
    `max_conns`."""

    insecure: bool
    files: tls.TlsFiles | None
    port: int
    max_conns: int
    max_handshakes: int
    closed: bool
    _ctx: ssl.SSLContext | None
    _stamp: tuple[float, ...] | None
    _opening: dict[socket.socket, float]  # accepted, handshake not done yet -> when accepted
    _refusing: set[socket.socket]  # refused (over max_conns), until their clients close
    _lock: threading.Lock

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
