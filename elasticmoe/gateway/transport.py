"""How the gateway's RunExperts calls reach a shard: the transport seam, its errors, and one unary call each."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Collection, Literal, Protocol

import grpc

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.options import channel_options

log = logging.getLogger(__name__)

TransportName = Literal["unary", "stream", "socket"]
Build = Callable[[], frames.AnyRequest]  # makes the request where the transport likes; the transport encodes it
HEALTH_S = 5.0  # how long asking a shard's Health for its message limit may take
# A channel to a shard retries connecting at most this far apart (gRPC's backoff grows to 120 s): a shard started
# again on its address after a while down (a port range) is reached within about a second, not reported dead.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
# gRPC's own refusal of a call past a server's maximum_concurrent_rpcs (grpc._server; RESOURCE_EXHAUSTED): the shard
# is alive, only full, as when it says frames.BUSY itself
GRPC_CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded!"


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

    # optional: retain(addresses) closes what the transport keeps for shards at other addresses (the dispatcher
    # calls it with the addresses of its tables whenever a new one comes)


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


def closed_error() -> TransportError:
    """The failure of a call sent, or in flight, when its transport is closed."""
    return TransportError(grpc.StatusCode.CANCELLED, "transport closed")


def failed(e: BaseException) -> Future:
    """A call's Future, failed with `e` before it was sent."""
    fut: Future = Future()
    fut.set_exception(e)
    return fut


def _exhausted(e: BaseException) -> str | None:
    """The details of a RESOURCE_EXHAUSTED call failure, else None."""
    if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return e.details() or ""
    return None


def is_busy(e: BaseException) -> bool:
    """A shard's refusal because it is full (RESOURCE_EXHAUSTED "shard busy: ...", or gRPC's own past the server's
    maximum_concurrent_rpcs, GRPC_CONCURRENCY_LIMIT): the shard is alive."""
    details = _exhausted(e)
    return details is not None and (details.startswith(frames.BUSY) or details == GRPC_CONCURRENCY_LIMIT)


def is_oversize(e: BaseException) -> bool:
    """A call larger than its shard takes, failed unsent or refused by the shard (ask again: the next calls are
    sized within the limit the shard announced meanwhile)."""
    return (_exhausted(e) or "").startswith(frames.OVERSIZE)


def is_short(e: BaseException) -> bool:
    """A shard out of memory for the call's tokens (RESOURCE_EXHAUSTED "shard out of memory: ..."): the shard is
    alive; the same call may not fit it again."""
    return (_exhausted(e) or "").startswith(frames.OUT_OF_MEMORY)


def _too_large(e: BaseException) -> bool:
    """gRPC's own refusal of a message over a limit (RESOURCE_EXHAUSTED "... message larger than max ...")."""
    return "message larger than max" in (_exhausted(e) or "")


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
        # guards _stubs, closed and retain's pass over _limits; the subclasses' own locks (StreamTransport's
        # _streams_lock, SocketTransport's _conns_lock) are never held with it: each is let go before the other is
        # taken (they shared this one attribute by accident, one lock for both, nested nowhere)
        self._channels_lock = threading.Lock()
        self._limits: dict[str, int] = {}  # address -> the largest message its shard takes (Health)
        self.closed = False  # set by close_channels: no channel (nor connection) opens after it

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
        with self._channels_lock:  # the channel as it is (not stub(): that would take a renewal from the transport)
            stub = self._stubs.get(address, (None,))[0]
        if stub is not None:  # else: replaced (renewed) or dropped (retain), the next channel asks
            try:
                self._ask_limit(address, stub, wait=True)
            except ValueError:  # its channel closed since (retain, close): gRPC starts no call on it
                pass
        # 0 when never told, or forgotten (retain dropped the shard): gRPC's words then carry both sizes alone
        limit = self.limit(address)
        said = f"takes {limit} bytes" if limit else "refused it, its limit not known"
        return TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{frames.OVERSIZE}: {address} {said} ({e.details()})")

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
        """The stub and channel for `address`, and whether the channels were just replaced (renewed certificates);
        CANCELLED (TransportError) once the transport is closed."""
        with self._channels_lock:
            if self.closed:
                raise closed_error()
            renewed = self.renewal.changed()
            if renewed:
                self._stubs.clear()  # calls in flight finish on their old channel
            if address not in self._stubs:
                ch = tls.channel(address, [*(self.options or channel_options()), *RECONNECT_OPTIONS],
                                 insecure=self.insecure)
                self._stubs[address] = (pb_grpc.ExpertShardStub(ch), ch)
                if self.ask_limits:
                    self._ask_limit(address, self._stubs[address][0])
            return (*self._stubs[address], renewed)

    def retain(self, addresses: Collection[str]) -> None:
        """Close the channels to shards at addresses not in `addresses` and forget their limits: shard replicas
        come and go (a new address each) for as long as the gateway runs. What a call still in flight to one of
        them (hedged around: its step is over) gets is CANCELLED."""
        with self._channels_lock:
            gone = [a for a in self._stubs if a not in addresses]
            channels = [self._stubs.pop(a)[1] for a in gone]
            # a copy of the keys (list() takes it at once): Health answers add limits without the lock, from
            # gRPC's or a connection's thread; a late one may add a departed shard's back
            for a in [a for a in list(self._limits) if a not in addresses]:
                self._limits.pop(a, None)
        for ch in channels:
            ch.close()

    def close_channels(self) -> None:
        """Close every channel (the transport's close: its calls in flight end CANCELLED); no channel opens after."""
        with self._channels_lock:
            self.closed = True
            channels, self._stubs = [ch for _, ch in self._stubs.values()], {}
        for ch in channels:
            ch.close()


class UnaryTransport(_Channels):
    """One unary RunExperts call per request, issued from a thread pool (the request is built there too). The
    deadline runs from send(): a call that waited in the pool gets what is left of it, none left: DEADLINE_EXCEEDED,
    unsent."""

    def __init__(self, insecure: bool = False, workers: int = 64):
        super().__init__(insecure)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fanout")

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        try:
            stub, _ = self.stub(address)
        except TransportError as e:  # closed: no channel opens
            return failed(e)
        deadline = time.monotonic() + timeout_s

        def call():
            if (left := deadline - time.monotonic()) <= 0:  # all of it spent waiting for a worker
                raise TransportError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            try:
                return stub.RunExperts(frames.as_proto(build()), timeout=left)
            except grpc.RpcError as e:
                raise self.refusal(address, e) from None
        try:
            return self._pool.submit(call)
        except RuntimeError:  # the pool shut down since (close)
            return failed(closed_error())

    wait = staticmethod(wait_any)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.close_channels()


def make_transport(kind: TransportName | ExpertTransport, insecure: bool) -> ExpertTransport:
    """'unary', 'stream' or 'socket' (gateway.socket_transport); an ExpertTransport object is used as it is."""
    if kind == "unary":
        return UnaryTransport(insecure)
    if kind == "stream":
        from elasticmoe.gateway.stream_transport import StreamTransport  # it builds on this module

        return StreamTransport(insecure)
    if kind == "socket":
        from elasticmoe.gateway.socket_transport import SocketTransport  # it builds on this module

        return SocketTransport(insecure)
    if isinstance(kind, str):
        raise ValueError(f"transport: {kind!r}, want 'unary', 'stream' or 'socket'")
    return kind
