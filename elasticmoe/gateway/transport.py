"""How the gateway's RunExperts calls reach a shard: one unary call each, or frames on one stream per shard."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Literal, Protocol

import grpc

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.options import channel_options

log = logging.getLogger(__name__)

TransportName = Literal["unary", "stream", "socket"]
Build = Callable[[], frames.AnyRequest]  # makes the request where the transport likes; the transport encodes it
STREAM_METHOD = "/elasticmoe.internal.v1.ExpertShard/RunExpertsStream"
HEALTH_S = 5.0  # how long asking a shard's Health for its message limit may take


class ExpertTransport(Protocol):
    """Sends RunExperts requests to shards; each answer (or failure, a grpc.RpcError) arrives on a Future.

    An answer reads as a RunExpertsResponse: output (for codec.decode_tensor), missing, compute_us.
    """

    def send(self, address: str, build: Build, timeout_s: float) -> Future: ...

    def limit(self, address: str) -> int:
        """The largest message the shard at `address` said it takes (0: not known): calls stay within it."""

    def wait(self, futures: list[Future], timeout_s: float) -> None:
        """Until one of `futures` (of this transport's calls, or chained to them) is done or timeout_s has passed;
        a transport may read the answers on the waiting thread."""

    def close(self) -> None: ...


def wait_any(futures: list[Future], timeout_s: float) -> None:
    """ExpertTransport.wait where other threads resolve the answers (gRPC's)."""
    wait(futures, timeout_s, FIRST_COMPLETED)


class TransportError(grpc.RpcError):
    """A failed call of a transport that has no grpc.Call to show: the status code and message, as grpc's."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def is_busy(e: BaseException) -> bool:
    """A shard's refusal because it is full (RESOURCE_EXHAUSTED "shard busy: ..."): the shard is alive."""
    return (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and (e.details() or "").startswith(frames.BUSY))


def is_oversize(e: BaseException) -> bool:
    """A call larger than its shard takes, failed unsent or refused by the shard (ask again: the next calls are
    sized within the limit the shard announced meanwhile)."""
    return (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and (e.details() or "").startswith(frames.OVERSIZE))


def _too_large(e: BaseException) -> bool:
    """gRPC's own refusal of a message over a limit (RESOURCE_EXHAUSTED "... message larger than max ...")."""
    return (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "message larger than max" in (e.details() or ""))


class _Channels:
    """One channel (and stub) per shard address; all replaced when the TLS files are renewed. Each new channel asks
    its shard's Health for the shard's message limit (`limit`), without waiting; `ask_limits` False: the subclass
    asks itself."""

    ask_limits = True

    def __init__(self, insecure: bool, options: list[tuple[str, int]] | None = None):
        self.insecure = insecure  # plaintext to the shards (insecure_internal); mTLS otherwise
        self.options = options  # grpc channel options; None: codec.channel_options()
        self.renewal = tls.Renewal(insecure)
        self._stubs: dict[str, tuple[pb_grpc.ExpertShardStub, grpc.Channel]] = {}
        self._lock = threading.Lock()
        self._limits: dict[str, int] = {}  # address -> the largest message its shard takes (Health)

    def limit(self, address: str) -> int:
        """The largest message the shard at `address` announced (0: not known yet: the gateway's own limit)."""
        return self._limits.get(address, 0)

    def _told(self, address: str, health: grpc.Future) -> None:
        if health.exception() is None and health.result().max_message_bytes:
            self._limits[address] = min(health.result().max_message_bytes, frames.LIMIT)

    def _ask_limit(self, address: str, stub: pb_grpc.ExpertShardStub, wait: bool = False) -> None:
        """Ask the shard's Health for its message limit: in the background, or (`wait`) until it has answered."""
        health = stub.Health.future(pb.HealthRequest(), timeout=HEALTH_S)
        if wait:
            health.exception()  # until answered or HEALTH_S has passed
            self._told(address, health)
        else:
            health.add_done_callback(lambda f: self._told(address, f))

    def refusal(self, address: str, e: BaseException) -> BaseException:
        """A call's failure as the failover sees it: a shard's refusal of a message over its limit (gRPC's) becomes
        an OVERSIZE refusal, once the shard's limit is asked again (the call is split anew, the shard is alive)."""
        if not _too_large(e):
            return e
        with self._lock:  # the channel as it is (not stub(): that would take a renewal from the transport's view)
            stub = self._stubs.get(address, (None,))[0]
        if stub is not None:  # else: replaced (renewed), the next channel asks
            self._ask_limit(address, stub, wait=True)
        return TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{frames.OVERSIZE}: {address} takes {self.limit(address)} bytes ({e.details()})")

    def check_size(self, address: str, size: int) -> None:
        """Raise OVERSIZE for a message of `size` bytes over the limit the shard announced (it would refuse it)."""
        if (limit := self.limit(address)) and size > limit:
            raise TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"{frames.OVERSIZE}: {size} bytes, {address} takes {limit}")

    def stub(self, address: str) -> tuple[pb_grpc.ExpertShardStub, bool]:
        """The stub for `address`, and whether the channels were just replaced (renewed certificates)."""
        stub, _, renewed = self.connection(address)
        return stub, renewed

    def connection(self, address: str) -> tuple[pb_grpc.ExpertShardStub, grpc.Channel, bool]:
        """The stub and channel for `address`, and whether the channels were just replaced (renewed certificates)."""
        with self._lock:
            renewed = self.renewal.changed()
            if renewed:
                self._stubs.clear()  # calls in flight finish on their old channel
            if address not in self._stubs:
                ch = tls.channel(address, self.options or channel_options(), insecure=self.insecure)
                self._stubs[address] = (pb_grpc.ExpertShardStub(ch), ch)
                if self.ask_limits:
                    self._ask_limit(address, self._stubs[address][0])
            return (*self._stubs[address], renewed)

    def close_channels(self) -> None:
        """Close every channel (the transport's close: its calls in flight end CANCELLED)."""
        with self._lock:
            channels, self._stubs = [ch for _, ch in self._stubs.values()], {}
        for ch in channels:
            ch.close()


class UnaryTransport(_Channels):
    """One unary RunExperts call per request, issued from a thread pool (the request is built there too)."""

    def __init__(self, insecure: bool = False, workers: int = 64):
        super().__init__(insecure)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fanout")

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        stub, _ = self.stub(address)

        def call():
            try:
                return stub.RunExperts(frames.as_proto(build()), timeout=timeout_s)
            except grpc.RpcError as e:
                raise self.refusal(address, e) from None
        return self._pool.submit(call)

    wait = staticmethod(wait_any)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.close_channels()


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
    died), its deadline kept by `deadlines`. Returns the call's Future (`fut`, when given: a fresh one)."""
    fut = Future() if fut is None else fut
    fut.set_running_or_notify_cancel()
    try:
        frame = encode()
    except Exception as e:  # noqa: BLE001 - a request that cannot be built fails its call
        fut.set_exception(e)
        return fut
    for _ in range(2):
        c = conn_for()
        deadlines.add(timeout_s, frame_id, c)  # before the write: a write that blocks still times out
        if c.submit(frame_id, frame, fut):
            return fut
    # both ended before taking the frame (a shard refusing connections ends them at once): say why
    fut.set_exception(c.error or TransportError(grpc.StatusCode.UNAVAILABLE, f"no connection to {address}"))
    return fut


class _Stream(Multiplexed):
    """One open RunExpertsStream: raw frames (rpc.frames) go out through a queue; a reader thread resolves answers
    by id. A reply that cannot be read ends the call (grpc fails it): the stream's pending calls fail, the next
    send opens a new stream."""

    def __init__(self, channel: grpc.Channel, address: str, refusal: Callable[[str, BaseException], BaseException]):
        super().__init__(address)
        self._refusal = refusal  # the transport's: a frame over the shard's limit ends the stream (OVERSIZE)
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        method = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                       response_deserializer=frames.decode_reply, _registered_method=True)
        self._call = method(self._frames())
        threading.Thread(target=self._read, name=f"stream-{address}", daemon=True).start()

    def _frames(self):
        while (frame := self._out.get()) is not None:
            yield frame

    def submit(self, frame_id: int, frame: bytes, fut: Future) -> bool:
        """Queue a frame; False when the stream has died (the caller opens a new one). Queued under the lock, as
        close()'s end marker is: a half-close cannot come between (the frame would never be sent)."""
        with self._lock:
            if self.dead:
                return False
            self.pending[frame_id] = fut
            self._out.put(frame)
        return True

    def _read(self) -> None:
        err: grpc.RpcError = TransportError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} ended")
        try:
            for reply in self._call:
                self.resolve(reply)
        except grpc.RpcError as e:
            err = self._refusal(self.address, e)
        except Exception as e:  # noqa: BLE001 - any reader failure fails the stream's calls
            err = TransportError(grpc.StatusCode.INTERNAL, f"stream to {self.address}: {e}")
        self.fail(err)

    def fail(self, err: grpc.RpcError) -> None:
        self.fail_pending(err)
        self._out.put(None)

    def close(self) -> None:
        """Half-close: calls in flight (their frames all queued before the end marker) still get their answers."""
        with self._lock:
            self.dead = True
            self._out.put(None)


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

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify()


class StreamTransport(_Channels):
    """One long-lived bidirectional stream per shard; frames carry ids, answers are matched by id.

    A broken stream fails all its pending calls at once and is re-opened by the next send. Deadlines are kept
    here, per request: a late answer is dropped, the stream stays open.
    """

    def __init__(self, insecure: bool = False, options: list[tuple[str, int]] | None = None):
        super().__init__(insecure, options)
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count(1)
        self._deadlines = Deadlines("stream-deadlines")
        self._lock = threading.Lock()

    def _stream(self, address: str) -> _Stream:
        _, channel, renewed = self.connection(address)
        with self._lock:
            if renewed:
                for s in self._streams.values():
                    s.close()
                self._streams.clear()
            s = self._streams.get(address)
            if s is None or s.dead:
                s = self._streams[address] = _Stream(channel, address, self.refusal)
            return s

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        frame_id = next(self._ids)

        def encode() -> bytes:  # a frame over the shard's limit fails alone, unsent (the shard would end the stream)
            frame = frames.request_frame(frame_id, build())
            self.check_size(address, len(frame))
            return frame
        return send_multiplexed(address, frame_id, encode, lambda: self._stream(address), self._deadlines, timeout_s)

    wait = staticmethod(wait_any)

    def close(self) -> None:
        self._deadlines.close()
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.fail(TransportError(grpc.StatusCode.CANCELLED, "transport closed"))
            s._call.cancel()
        self.close_channels()


def make_transport(kind: TransportName | ExpertTransport, insecure: bool) -> ExpertTransport:
    """'unary', 'stream' or 'socket' (gateway.socket_transport); an ExpertTransport object is used as it is."""
    if kind == "unary":
        return UnaryTransport(insecure)
    if kind == "stream":
        return StreamTransport(insecure)
    if kind == "socket":
        from elasticmoe.gateway.socket_transport import SocketTransport  # it builds on this module

        return SocketTransport(insecure)
    if isinstance(kind, str):
        raise ValueError(f"transport: {kind!r}, want 'unary', 'stream' or 'socket'")
    return kind
