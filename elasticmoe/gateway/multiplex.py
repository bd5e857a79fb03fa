"""Calls multiplexed by frame id on one connection per shard, and their deadlines (stream and socket transports)."""

from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import Future
from typing import Callable

import grpc

from elasticmoe.gateway.transport import TransportError

_CODES = {c.value[0]: c.value for c in grpc.StatusCode}  # status code number -> grpc's (code, name)


class Multiplexed:
    """Calls in flight on one connection to a shard, by frame id (the stream and socket transports' connections)."""

    def __init__(self, address: str):
        self.address = address
        self.pending: dict[int, Future] = {}
        self.dead = False
        self.error: grpc.RpcError | None = None  # why it ended (a refusal's RESOURCE_EXHAUSTED, say)
        self._lock = threading.Lock()

    def take(self, frame_id: int) -> Future | None:
        with self._lock:
            return self.pending.pop(frame_id, None)

    def resolve(self, reply) -> None:
        """An answer: its call's result, or its error as the shard's status code."""
        fut = self.take(reply.id)
        if fut is None:
            return  # past its deadline: already failed (or id 0: an unreadable frame)
        if reply.code:
            fut.set_exception(TransportError(grpc.StatusCode(_CODES.get(reply.code, grpc.StatusCode.UNKNOWN.value)),
                                             reply.error))
        else:
            fut.set_result(reply)

    def unended(self, queued, at: int) -> list:
        """(Holding _lock.) Those of `queued` (tuples, each a frame's with its frame id at index `at`) whose calls have
        not ended: the others' calls passed their deadline (or failed), nobody would read their answers and the shard
        would compute them all the same. Id 0 names no call (the stream's end marker, a spilled frame partly written,
        which must go on): kept."""
        return [x for x in queued if not x[at] or x[at] in self.pending]

    def fail_unreadable(self, e: BaseException, frame_id: int) -> None:
        """An answer that cannot be read though its framing is intact and its frame id was read: that call alone
        fails (INTERNAL); the connection's other calls still get their answers."""
        if (fut := self.take(frame_id)) is not None:
            fut.set_exception(TransportError(grpc.StatusCode.INTERNAL, f"{self.address}: {e}"))

    def fail_pending(self, err: grpc.RpcError) -> None:
        """Mark dead and fail every pending call at once (failover sees them all now, not at their deadlines)."""
        with self._lock:
            self.dead = True
            self.error = self.error or err
            pending, self.pending = self.pending, {}
        for fut in pending.values():
            fut.set_exception(err)


def send_multiplexed(address: str, frame_id: int, encode: Callable[[], object], conn_for: Callable[[], Multiplexed],
                     deadlines: "Deadlines", timeout_s: float, fut: Future | None = None) -> Future:
    """One call on a multiplexed connection: encode the frame, submit it (one fresh connection if the one found has
    died; conn_for raises TransportError once the transport is closed: the call fails with it), its deadline kept by
    `deadlines`. Returns the call's Future (`fut`, when given: a fresh one). A call with no time left (timeout_s <= 0)
    fails DEADLINE_EXCEEDED here, unsent, as it would at its deadline."""
    fut = Future() if fut is None else fut
    fut.set_running_or_notify_cancel()
    if timeout_s <= 0:
        fut.set_exception(TransportError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
        return fut
    try:
        frame = encode()
    except Exception as e:  # noqa: BLE001 - a request that cannot be built fails its call
        fut.set_exception(e)
        return fut
    for _ in range(2):
        try:
            c = conn_for()
        except TransportError as e:  # the transport is closed: no connection opens (nothing would close it)
            fut.set_exception(e)
            return fut
        deadlines.add(timeout_s, frame_id, c)  # before the write: a write that blocks still times out
        if c.submit(frame_id, frame, fut):
            return fut
    # both ended before taking the frame (a shard refusing connections ends them at once): say why
    fut.set_exception(c.error or TransportError(grpc.StatusCode.UNAVAILABLE, f"no connection to {address}"))
    return fut


DEADLINE_GRAIN_S = 0.05  # the deadline thread sweeps at most this often: a call fails up to this late


class Deadlines:
    """Per-request deadlines of a transport that multiplexes calls on one connection: a thread fails each call still
    pending at its deadline with DEADLINE_EXCEEDED (its late answer is then dropped; the connection stays).

    Every call's entry stays until its deadline, answered or not, so in steady traffic one expires per call; the
    thread sweeps them every DEADLINE_GRAIN_S at most instead of waking once per call (it did: ~1,000 wake-ups a
    second at 1,000 calls a second, each taking the GIL from the engine thread)."""

    def __init__(self, name: str):
        self._heap: list[tuple[float, int, object]] = []  # (monotonic deadline, id, its connection: has take(id))
        self._cv = threading.Condition()
        self.closed = False
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def add(self, timeout_s: float, frame_id: int, conn) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cv:  # wake the thread only for a new earliest deadline (not once per frame)
            if not self._heap or deadline < self._heap[0][0]:
                self._cv.notify()
            heapq.heappush(self._heap, (deadline, frame_id, conn))

    def _loop(self) -> None:
        with self._cv:
            while not self.closed:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, frame_id, conn = heapq.heappop(self._heap)
                    fut = conn.take(frame_id)
                    if fut is not None:
                        fut.set_exception(TransportError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
                self._cv.wait(max(self._heap[0][0] - now, DEADLINE_GRAIN_S) if self._heap else None)

    def close(self, err: grpc.RpcError | None = None) -> None:
        """Stop the thread; with `err`, fail every call still pending with it: those on connections the transport
        no longer holds (retired by renewed TLS files) too, whose deadlines nothing would keep any more."""
        with self._cv:
            self.closed = True
            entries, self._heap = self._heap, []
            self._cv.notify()
        for _, frame_id, conn in entries if err is not None else []:
            if (fut := conn.take(frame_id)) is not None:
                fut.set_exception(err)
