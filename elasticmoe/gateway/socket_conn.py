"""The socket transport's connection to one shard's frame listener (_Conn): opening it, writing frames, ending it."""

from __future__ import annotations

import collections
import logging
import socket
import threading
from concurrent.futures import Future
from typing import Callable

import grpc

from elasticmoe.gateway.socket_reading import Reading
from elasticmoe.gateway.transport import TransportError, is_busy
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.tls_socket import SerialTLS

log = logging.getLogger(__name__)
SPILL_FRAMES = 32  # frames waiting for a shard slow to read, at most; one more is refused as busy (another copy)
SPILL_BYTES = 256 << 20  # and their bytes, at most: a frame that would pass it is refused so (one goes when alone)
# (both bound the frames sent while the connection opens too: the backlog, written to the spill once open)
Opener = Callable[[], "tuple[socket.socket | SerialTLS, int]"]  # the connection's socket, the shard's message limit


class _Conn(Reading):
    """One connection to a shard's frame listener. Its thread opens it (Health for the port, TCP, TLS), sends the
    frames submitted meanwhile, then reads answers and resolves them by id; afterwards callers write their frames
    themselves (sendmsg, no thread hop). Reading the answers is Reading's (socket_reading.py): under the
    connection's read token, a waiting caller's thread or this one. Any failure (cannot connect, broken, a reply
    whose frame id cannot be read) fails every pending call at once and marks it dead (a readable id's unreadable
    reply fails that call alone; a failed write ends it once the reader has read what came before: a refusal there
    fails the calls as busy); the next send opens a new one.
    A frame larger than the shard's limit (Health) fails alone, unsent (OVERSIZE): the shard would end the
    connection."""

    def __init__(self, address: str, opener: Opener):
        super().__init__(address)  # Multiplexed's _lock guards pending, dead, retired, sock, backlog
        self.retired = False
        self.sock: socket.socket | SerialTLS | None = None
        self._backlog: list[tuple[int, list]] | None = []  # (id, frame) submitted while connecting; None once open
        self._backlog_bytes = 0  # the bytes of those frames
        self.limit = 0  # the largest frame the shard takes, prefix included (Health; 0: not told)
        self._send_lock = threading.Lock()  # one frame on the wire at a time
        self._spill: collections.deque = collections.deque()  # (unsent rest, frame, its bytes, its id; 0: partly
        self._spilled = 0  # written, it must go on): what the writer thread owes; the bytes of those frames (whole)
        threading.Thread(target=self._run, args=(opener,), name=f"frames-{address}", daemon=True).start()

    def submit(self, frame_id: int, parts: list, fut: Future) -> bool:
        """Send a frame (a list of buffers); False when the connection is dead or retired (use a new one)."""
        sock = None
        with self._lock:
            if self.dead or self.retired:
                return False
            if self._backlog is not None:  # connecting: written once open
                err = self._to_backlog(frame_id, parts, fut)
            elif (err := self._oversize(parts)) is None:
                self.pending[frame_id] = fut
                sock = self.sock
        if err is not None:
            fut.set_exception(err)
        if sock is None:
            return True
        try:
            with self._send_lock:  # what the socket takes now goes now; the rest waits for the writer thread
                self._write_or_spill(sock, frame_id, parts)
        except OSError as e:
            self._broken(e)
        return True

    def _to_backlog(self, frame_id: int, parts: list, fut: Future) -> TransportError | None:
        """(Holding _lock, while connecting.) Keep the frame for the connection once open, bounded as the spill it
        goes to then: past SPILL_FRAMES or SPILL_BYTES (one frame alone always goes), once the frames of calls that
        ended meanwhile (their deadline) are dropped, the refusal as busy is returned instead."""
        size = frame_socket.nbytes(parts)

        def over() -> bool:
            n = len(self._backlog)
            return bool(n) and (n >= SPILL_FRAMES or self._backlog_bytes + size > SPILL_BYTES)
        if over():
            self._backlog = self.unended(self._backlog, 0)
            self._backlog_bytes = sum(frame_socket.nbytes(p) for _, p in self._backlog)
        if over():
            return TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{frames.BUSY}: {len(self._backlog)} frames ({self._backlog_bytes} bytes) wait for the connection to "
                f"{self.address} to open"))
        self.pending[frame_id] = fut
        self._backlog.append((frame_id, parts))
        self._backlog_bytes += size
        return None

    def _write_or_spill(self, sock, frame_id: int, parts: list) -> None:
        """(Holding _send_lock.) Write what the socket takes now; the rest goes to the writer thread, and so does the
        whole frame while earlier ones still wait there (one more than SPILL_FRAMES, or one taking them past
        SPILL_BYTES, once those of calls that ended are dropped, fails its call as busy)."""
        if self._spill:
            size = frame_socket.nbytes(parts)
            if self._spill_full(size):
                if (refused := self.take(frame_id)) is not None:
                    refused.set_exception(TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                        f"{frames.BUSY}: {self.address} has not read the {len(self._spill)} frames "
                        f"({self._spilled} bytes) before")))
                return
            self._spill.append((frame_socket.unsent(sock, parts), parts, size, frame_id))  # whole: may be skipped
            self._spilled += size
        elif rest := frame_socket.send_parts_nowait(sock, parts):  # (the common case, all of it sent: no sizing)
            size = frame_socket.nbytes(parts)
            self._spill.append((rest, parts, size, 0))  # parts: its `keep` holds the tensors the rest points into
            self._spilled = size
            threading.Thread(target=self._write_spilled, args=(sock,), name=f"frames-out-{self.address}",
                             daemon=True).start()

    def _write_spilled(self, sock) -> None:
        """While frames wait (the shard reads slower than frames come, or a frame is larger than the socket's
        buffers): write them in order, waiting for room, then end. Callers queue behind it meanwhile, never waiting
        themselves: a shard that stops reading holds no engine step (its calls time out and fail over); one that
        moves nothing for frame_socket.SEND_TIMEOUT_S ends the connection."""
        with self._send_lock:
            rest = self._spill[0][0]  # (the frame's parts stay in the deque: the rest may point into them)
        while True:
            try:
                frame_socket.send_rest(sock, rest)
            except OSError as e:
                with self._send_lock:
                    self._spill.clear()
                    self._spilled = 0
                self._broken(e)
                return
            with self._send_lock:  # the pop and the look at what is left in one hold: a caller finding the queue
                self._spilled -= self._spill.popleft()[2]  # empty writes its frame itself and may start the
                self._drop_ended(begun=False)  # next writer thread
                if not self._spill:
                    return
                rest = self._spill[0][0]

    def _drop_ended(self, begun: bool) -> None:
        """(Holding _send_lock.) Drop the waiting frames whose calls have ended (past their deadline, say): nobody
        would read their answers, and the shard would compute them all the same. `begun`: the first may be on its
        way (the writer thread's), so it stays; a frame partly written (id 0) always goes on."""
        with self._lock:
            head = [self._spill.popleft()] if begun and self._spill else []
            kept = head + self.unended(self._spill, 3)
        self._spill.clear()
        self._spill.extend(kept)
        self._spilled = sum(x[2] for x in kept)

    def _spill_full(self, size: int) -> bool:
        """(Holding _send_lock.) Whether a frame of `size` bytes would pass SPILL_FRAMES / SPILL_BYTES, once the
        waiting frames of calls that have ended (past their deadline) are dropped."""
        def over() -> bool:
            return len(self._spill) >= SPILL_FRAMES or self._spilled + size > SPILL_BYTES
        if over():
            self._drop_ended(begun=True)
        return over()

    def _oversize(self, parts: list) -> TransportError | None:
        """The failure for a frame larger than the shard takes; None when it fits (or the limit is not known)."""
        size = frame_socket.nbytes(parts)
        if not self.limit or size <= self.limit:
            return None
        return TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{frames.OVERSIZE}: {size} bytes, {self.address} takes {self.limit}")

    def take(self, frame_id: int) -> Future | None:
        with self._lock:
            fut = self.pending.pop(frame_id, None)
            done = self.retired and not self.pending
        if done:  # retired and every answer in: end it (the reader sees the end)
            self._shut()
        return fut

    def _run(self, opener: Opener) -> None:
        try:
            sock, self.limit = opener()
        except Exception as e:  # noqa: BLE001 - whatever stops the opening fails the calls waiting for it
            code = e.code() if isinstance(e, grpc.RpcError) else grpc.StatusCode.UNAVAILABLE
            log.info("frames to %s: cannot connect: %s", self.address, e)
            if is_busy(e):  # Health refused by a full shard (gRPC's concurrency limit): busy, as its calls would be
                self.fail(TransportError(code, f"{frames.BUSY}: cannot connect to {self.address}: {e.details()}"))
                return
            self.fail(TransportError(code if code != grpc.StatusCode.DEADLINE_EXCEEDED else
                                     grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.address}: {e}"))
            return
        with self._send_lock:
            with self._lock:
                self.sock, backlog, self._backlog = sock, self._backlog, None
                self._reader = frame_socket.FrameReader(sock)  # last: claim() takes a set reader for an open socket
                dead = self.dead
                idle = self.retired and not self.pending  # retired while opening: its _shut found no socket
            try:
                for frame_id, parts in [] if dead else backlog:
                    if frame_id not in self.pending:  # its call ended while connecting (its deadline): not sent
                        continue
                    if (err := self._oversize(parts)) is None:
                        self._write_or_spill(sock, frame_id, parts)
                    elif (fut := self.take(frame_id)) is not None:
                        fut.set_exception(err)
            except OSError as e:
                self._broken(e)
            except Exception as e:  # noqa: BLE001 - a bug: fail the calls rather than leave them to their deadlines
                log.exception("frames to %s: writing the frames sent while connecting failed", self.address)
                self.fail(TransportError(grpc.StatusCode.INTERNAL, f"connection to {self.address}: {e}"))
        if idle:
            self._shut()  # nothing to answer: end it (the reader sees the end)
        try:
            self._serve()
        finally:
            with self._token:  # not under a caller reading it
                sock.close()

    def _broken(self, e: OSError) -> None:
        """A write failed: no new frames; the reader reads what the shard wrote before (a refusal: a listener over its
        lingering cap closes at once, its reset failing our writes) and then the end, and fails the pending calls."""
        with self._lock:
            self.retired = True
        self._ending(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address} broken: {e}"))
        self._shut()  # the reader sees the end after what is already here

    def _shut(self) -> None:
        with self._lock:
            sock = self.sock
        if sock is not None:
            frame_socket.shutdown(sock)  # the reader wakes with the end of stream and closes it

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
