"""Raw frames (rpc.frames) on one TCP connection, no gRPC: a shard's frame listener and the reads and writes both ends
share. Each frame is an ExpertFrame message exactly as RunExpertsStream carries it; its 8-byte prefix (frames.
frame_size) is the length prefix. mTLS as the gRPC servers (rpc.tls: the release's CA, client certificates required).

A reply with id 0 and RESOURCE_EXHAUSTED, then the end of the connection: the listener refused the connection."""

from __future__ import annotations

import atexit
import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from typing import Callable, Iterator

import grpc
import torch

from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.options import MAX_MESSAGE_BYTES
from elasticmoe.rpc.tls_socket import SerialTLS

log = logging.getLogger(__name__)
PREFIX = 8  # bytes of an ExpertFrame's prefix: the frame's length prefix on the socket
_SMALL = 64 << 10  # buffers up to this size are joined before a TLS write (one record, not one per piece)
_CHUNK = 256 << 10  # a FrameReader's receive buffer: frames up to _SMALL are read into it, then copied out
Put = Callable[[list], None]  # takes one reply frame as a list of buffers (frames.reply_parts)
HANDSHAKE_S = 10.0
SEND_TIMEOUT_S = 10
EXIT_WAIT_S = 5.0  # at interpreter exit, how long the open listeners' frames in progress may take to finish


def send_parts(sock: socket.socket, parts: list) -> None:
    """Write one frame given as byte buffers (frames.*_parts): one sendmsg on a plain socket (the tensors are not
    copied); joined small pieces and one write per large piece on TLS (ssl has no sendmsg; an SSLSocket or a
    SerialTLS). OSError when the connection is broken."""
    if isinstance(sock, (ssl.SSLSocket, SerialTLS)):
        small: list = []
        for v in parts:
            if len(v) <= _SMALL:
                small.append(v)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(v)
        if small:
            sock.sendall(b"".join(small))
        return
    sent = sock.sendmsg(parts)
    if sent == sum(map(len, parts)):  # all of it, nearly always
        return
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
        if views:
            sent = sock.sendmsg(views[:512])


def _buffer(n: int) -> memoryview:
    """n writable bytes the frame keeps (its tensors are views of them): uninitialised when large (no memset)."""
    if n <= _SMALL:
        return memoryview(bytearray(n))
    return memoryview(torch.empty(n, dtype=torch.uint8).numpy()).cast("B")


class FrameReader:
    """The frames arriving on one connection, read with as few recv calls as it takes: small frames land in one
    chunk (prefix and body in one recv, several frames in one when they queue) and are copied out into a buffer
    of their own; a large frame's body is read straight into its own buffer (its tensors are views of it)."""

    def __init__(self, sock: socket.socket, chunk: int = _CHUNK, limit: int = MAX_MESSAGE_BYTES):
        self.sock, self.limit = sock, limit  # limit: the largest frame body taken (a longer prefix: FrameError)
        self._view = memoryview(bytearray(chunk))
        self._start = self._end = 0  # bytes received and not yet handed out: _view[_start:_end]
        self._big: memoryview | None = None  # a large frame being read into its own buffer
        self._got = 0  # bytes of _big read so far

    def step(self, block: bool = True) -> list[memoryview] | None:
        """The whole frames already here, else those after one recv ([] when it brought no whole one); None at a
        clean end of stream. With block=False the recv does not wait: BlockingIOError when nothing can be read now.
        ConnectionError when the stream ends mid-frame, FrameError for a bad length prefix (the stream cannot be
        resynchronised: close it)."""
        out: list[memoryview] = []
        self._split(out)
        if out:
            return out
        recv = self.sock.recv_into if block else self._recv_nowait
        if self._big is not None:
            n = recv(self._big[self._got:])
            if n == 0:
                raise ConnectionError("connection closed mid-frame")
            self._got += n
            if self._got < len(self._big):
                return out
            out.append(self._big)
            self._big = None
            return out
        if len(self._view) - self._end < PREFIX + _SMALL:  # room for a whole small frame after what is here
            n = self._end - self._start
            self._view[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        n = recv(self._view[self._end:])
        if n == 0:
            if self._end == self._start:
                return None
            raise ConnectionError("connection closed mid-frame")
        self._end += n
        self._split(out)
        return out

    def _recv_nowait(self, view: memoryview) -> int:
        if isinstance(self.sock, SerialTLS):
            return self.sock.recv_nowait(view)
        return self.sock.recv_into(view, 0, socket.MSG_DONTWAIT)

    def buffered(self) -> bool:
        """Whether bytes already received wait inside the connection (decrypted TLS data) where poll() does not see
        them: read before waiting for the socket."""
        return isinstance(self.sock, SerialTLS) and self.sock.pending() > 0

    def _split(self, out: list) -> None:
        """Move the whole frames received into `out`; start a large frame's own buffer."""
        while self._big is None and (have := self._end - self._start) >= PREFIX:
            at = self._start
            size = frames.frame_size(self._view[at:at + PREFIX])
            if size > self.limit:
                raise frames.FrameError(f"frame of {size} bytes, more than the {self.limit}-byte message "
                                        f"limit (ELASTICMOE_GRPC_MAX_MESSAGE_BYTES)")
            total = PREFIX + size
            if total > _SMALL:  # its own buffer: what is here now, the rest straight from the socket
                self._big, self._got = _buffer(total), min(have, total)
                self._big[:self._got] = self._view[at:at + self._got]
                self._start += self._got
                if self._got == total:
                    out.append(self._big)
                    self._big = None
                continue
            if total > have:
                break
            out.append(memoryview(bytearray(self._view[at:at + total])))
            self._start += total
        if self._start == self._end:
            self._start = self._end = 0

    def frames(self) -> Iterator[memoryview]:
        """Every frame until a clean end of stream."""
        while (got := self.step()) is not None:
            yield from got


def send_timeout(sock: socket.socket, seconds: int = SEND_TIMEOUT_S) -> None:
    """A write that moves nothing for `seconds` fails (OSError): a peer that stopped reading breaks the connection
    instead of blocking the writer for ever. Reads stay blocking."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))


def shutdown(sock: socket.socket | SerialTLS) -> None:
    """Shut down both ways: a thread blocked in recv on it wakes with end of stream."""
    if isinstance(sock, SerialTLS):
        sock = sock.sock
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the fd's own shutdown, also under an SSLSocket
    except OSError:
        pass


def hard_close(sock: socket.socket) -> None:
    shutdown(sock)
    sock.close()


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
        self._threads: set[threading.Thread] = set()  # each connection's thread, until it returns
        self._lock = threading.Lock()
        self.closed = False
        self._cut = False  # set when the connections are cut (at close, or once its grace is over)
        _open_listeners.add(self)
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
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            try:
                if not self.closed:
                    send_parts(conn, frames.reply_parts(0, code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                                        error=f"{frames.BUSY}: {self.max_conns} frame connections open"))
            except OSError:
                pass
            hard_close(conn)
            return
        try:
            self.serve(self._frames(conn), self._sender(conn))
        except frames.FrameError as e:
            log.warning("frame listener %d: %s; closing that connection", self.port, e)
        except OSError:
            pass  # the client went away
        finally:
            with self._lock:
                self._conns.discard(conn)
            hard_close(conn)

    @staticmethod
    def _sender(conn: socket.socket) -> Put:
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

    def _frames(self, conn: socket.socket) -> Iterator:
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
        interpreter finalizes aborts the process."""
        with self._lock:
            self.closed = True
            conns, self._conns = list(self._conns) + list(self._opening), set()
            threads = list(self._threads)
        _open_listeners.discard(self)
        hard_close(self.sock)
        done = threading.Event()

        def cut() -> None:
            self._cut = True
            for c in conns:
                shutdown(c)

        def finish() -> None:
            for t in threads:
                t.join()
            done.set()
        if grace and conns:
            waiter = threading.Timer(grace, lambda: (cut(), finish()))
        else:
            cut()  # now: the clients see the end before close() returns
            waiter = threading.Thread(target=finish, name=f"frames-{self.port}-close")
        waiter.daemon = True
        waiter.start()
        return done


_open_listeners: "weakref.WeakSet[FrameListener]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close the listeners still open and give their frames in progress up to EXIT_WAIT_S to finish (atexit runs
    before the interpreter finalizes; their daemon threads would otherwise be stopped inside torch)."""
    listeners = list(_open_listeners)
    done = [x.close() for x in listeners]
    end = time.monotonic() + EXIT_WAIT_S
    for d in done:
        d.wait(max(0.0, end - time.monotonic()))
