"""Raw frames (rpc.frames) on one TCP connection, no gRPC: the reads and writes both ends share (the gateway's socket
transport and the shard's rpc.frame_listener). Each frame is an ExpertFrame message exactly as RunExpertsStream
carries it; its 8-byte prefix (frames.frame_size) is the length prefix."""

from __future__ import annotations

import socket
import ssl
import struct
from typing import Iterator

import torch

from elasticmoe.rpc import frames
from elasticmoe.rpc.options import MAX_MESSAGE_BYTES
from elasticmoe.rpc.tls_socket import WRITE_BYTES, SerialTLS

PREFIX = 8  # bytes of an ExpertFrame's prefix: the frame's length prefix on the socket
_SMALL = 64 << 10  # buffers up to this size are joined before a TLS write (one record, not one per piece)
_CHUNK = 256 << 10  # a FrameReader's receive buffer: frames up to _SMALL are read into it, then copied out
SEND_TIMEOUT_S = 10
# TCP keepalive on frame connections, both ends: a peer whose host vanished without closing (power, network cut) is
# found dead after KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S of silence (60 s), not Linux's 2 h 11 min
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 30, 10, 3


def send_parts(sock: socket.socket, parts: list) -> None:
    """Write one frame given as byte buffers (frames.*_parts): one sendmsg on a plain socket (the tensors are not
    copied); joined small pieces and one write per large piece on TLS (ssl has no sendmsg; an SSLSocket or a
    SerialTLS). OSError when the connection is broken."""
    if isinstance(sock, (ssl.SSLSocket, SerialTLS)):
        for unit in _tls_units(parts):
            sock.sendall(unit)
        return
    sent = sock.sendmsg(parts)
    if sent == nbytes(parts):  # all of it, nearly always
        return
    views = _unsent_views(parts, sent)
    while views:
        _skip(views, sock.sendmsg(views[:512]))


def send_parts_nowait(sock: socket.socket | SerialTLS, parts: list) -> list:
    """As send_parts, without waiting for room: what could not be written now, as buffers for send_parts to write
    later in this order ([] when all of it went). A TLS write that could not go is in the rest whole (an SSL write
    that must wait is retried with the same bytes). OSError when the connection is broken."""
    if isinstance(sock, SerialTLS):
        units = _tls_units(parts)
        for i, unit in enumerate(units):
            sent = sock.send_nowait(unit)
            if sent < len(unit):
                return [unit[sent:] if sent else unit, *units[i + 1:]]
        return []
    try:
        sent = sock.sendmsg(parts, (), socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent == nbytes(parts):  # all of it, nearly always: no views made
        return []
    views = _unsent_views(parts, sent)
    while views:
        try:
            _skip(views, sock.sendmsg(views[:512], (), socket.MSG_DONTWAIT))
        except BlockingIOError:
            return views
    return []


def nbytes(parts: list) -> int:
    """A frame's bytes (frames.*_parts: bytes, byte-sized ctypes arrays, byte memoryviews: len is their size)."""
    return sum(map(len, parts))


def _unsent_views(parts: list, sent: int) -> list[memoryview]:
    """The bytes of `parts` after the first `sent`, as byte views (no copy)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    _skip(views, sent)
    return views


def _skip(views: list[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes of `views` (in place): what a partial sendmsg wrote."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if sent:
        views[0] = views[0][sent:]


def unsent(sock: socket.socket | SerialTLS, parts: list) -> list:
    """A frame not attempted yet as a rest for send_rest: on TLS its writes as send_parts makes them (small pieces
    joined, one record), not one write per buffer."""
    return _tls_units(parts) if isinstance(sock, SerialTLS) else parts


def send_rest(sock: socket.socket | SerialTLS, rest: list) -> None:
    """Write what send_parts_nowait (or unsent) left, in order, waiting for room: on TLS one write per unit as given
    (a write that had to wait is retried with the same bytes)."""
    if isinstance(sock, SerialTLS):
        for unit in rest:
            sock.sendall(unit)
    else:
        send_parts(sock, rest)


def _tls_units(parts: list) -> list:
    """A frame's buffers as TLS writes of at most WRITE_BYTES bytes: small pieces joined, large ones cut."""
    units, small = [], []
    for v in parts:
        if len(v) <= _SMALL:
            small.append(v)
            continue
        if small:
            units.append(b"".join(small))
            small = []
        view = memoryview(v).cast("B")
        units += [view[i:i + WRITE_BYTES] for i in range(0, len(view), WRITE_BYTES)]
    if small:
        units.append(b"".join(small))
    return units


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


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive with the timers above (where the platform has them: Linux, macOS 10.15+)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def send_timeout(sock: socket.socket, seconds: int | None = None) -> None:
    """A write that moves nothing for `seconds` (None: SEND_TIMEOUT_S) fails (OSError): a peer that stopped reading
    breaks the connection instead of blocking the writer for ever. Reads stay blocking. A plain socket's only: a
    blocking SSL write waits for room again after the timeout (use SerialTLS)."""
    seconds = SEND_TIMEOUT_S if seconds is None else seconds
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
