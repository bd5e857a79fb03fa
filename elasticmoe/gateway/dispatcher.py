"""The gateway's gRPC dispatcher: per MoE layer, one concurrent call per shard with all of its tokens."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import torch

from elasticmoe.gateway.failover import Step
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.shard_health import HEDGE_MEDIAN_EVERY, ShardHealth
from elasticmoe.gateway.step_groups import Call
from elasticmoe.gateway.transport import ExpertTransport, TransportName, make_transport
from elasticmoe.model.dispatch import ExpertsUnavailable
from elasticmoe.model.experts import COMBINE_DTYPE
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.frames import LIMIT, ExpertRequest, max_rows
from elasticmoe.rpc.staging import to_host

# A controller instance left behind (a restart) answers only calls sent to it before (they time out within seconds)
# or, while Serve replaces it, for its graceful shutdown: its epoch is refused this long, the newest this many
LEFT_EPOCH_TTL_S = 600.0
LEFT_EPOCHS_MAX = 16

__all__ = ["GrpcDispatcher", "HEDGE_MEDIAN_EVERY", "NoReplicaError", "RoutingTable"]


class NoReplicaError(ExpertsUnavailable):
    """No live shard holds an expert the step needs."""


class RowOverLimit(NoReplicaError):
    """A message limit below one token's row: no call can carry the step's tokens (the client is told why). It
    fails the same way on every attempt, so the engine does not retry the step but runs its requests one by one."""

    public = ("a gRPC message limit of the cluster (ELASTICMOE_GRPC_MAX_MESSAGE_BYTES, on the gateway or an expert "
              "shard) is below one token's row, so no call can carry this request; retrying fails the same way "
              "until the operator raises it")
    deterministic = True


class ShortOfMemory(NoReplicaError):
    """Every copy of some experts ran out of memory for the step's tokens (RESOURCE_EXHAUSTED): no table brings
    another, so the step ends at once; the engine does not repeat it at that size but runs it in halves at once (a
    prefill chunk failing alone in smaller pieces)."""

    public = "an expert shard ran out of memory for this request's tokens; retry later, or with fewer tokens"
    for_its_size = True


class GrpcDispatcher(ShardHealth):
    """Sends each shard, in one gRPC call, the step's tokens routed to it; combines the partial outputs.

    Inside the step, a failed, timed-out, malformed or `missing` call is re-sent to surviving copies of the
    same experts, and a straggler whose experts have another copy gets a hedged call (the first answer wins). A full
    shard's refusal (transport.is_busy) goes to another copy, else to that shard again shortly; it is not reported.
    Experts left with no live copy wait, up to `failover_s`, for the controller's next table. Failures are
    reported to `on_failure(shard id)` from a background thread, never from the engine thread.
    """

    remote = True  # dispatch() returns at once: the engine pipelines micro-batches around it

    def __init__(self, timeout_s: float = 5.0, on_failure: Callable[[str], RoutingTable | None] | None = None,
                 failover_s: float = 30.0, hedge_min_s: float = 0.1, hedge_factor: float = 4.0,
                 suspect_s: float = 3.0, insecure: bool = False,
                 transport: TransportName | ExpertTransport = "socket"):
        super().__init__(on_failure, suspect_s, hedge_min_s, hedge_factor)
        self.timeout_s, self.failover_s = timeout_s, failover_s
        self.insecure = insecure  # plaintext to the shards (insecure_internal); mTLS otherwise
        if insecure:
            tls.warn_insecure("gateway")
        self.transport = make_transport(transport, insecure)  # how calls reach the shards (gateway.transport)
        self.table: RoutingTable | None = None
        self._next: RoutingTable | None = None
        self._left_epochs: dict[str, float] = {}  # controller instances this dispatcher moved on from -> when
        self._lock = threading.Lock()
        self._forget_lock = threading.Lock()  # _forget_departed, one thread at a time (the engine's, the poller's)
        self.fanout_overhead_s: deque[float] = deque(maxlen=4096)  # wait minus shard compute, per (layer, step)
        self.shard_tokens: dict[str, int] = {}
        self.steps = 0  # engine steps begun (begin_step): moves a replicated expert's lone tokens between copies
        self.failovers = 0  # calls re-sent after a failure, `missing` or malformed answer
        self.hedges = 0  # calls re-sent because the first copy straggled
        # per step with a failed or hedged call: when seen, when done (failover.Step)
        self.fault_log: deque[dict] = deque(maxlen=256)
        self.on_fanout: Callable[[float], None] | None = None  # metrics hook, per (layer, step)
        self.call_limit_bytes = LIMIT  # a call's request and reply frames each stay within this (max_call_rows)

    # ----- routing tables
    def set_table(self, table: RoutingTable, now: bool = False) -> bool:
        """Install a new routing table: at the next step boundary, or at once (`now`); False if it is refused.

        Versions count within one controller instance (`epoch`): an older table of the newest known's instance is a
        late answer, refused. Another instance's table is a restarted controller's word, whatever its version (it
        starts over without its GCS record), unless it comes from an instance this dispatcher has moved on from."""
        with self._lock:
            latest = self.latest()
            if latest is not None and table.epoch == latest.epoch and table.version < latest.version:
                return False
            if table.epoch in self._left_epochs:
                return False
            if latest is not None and table.epoch != latest.epoch:
                self._leave(latest.epoch)
            self._next = table
            if now or self.table is None:
                self.table, self._next = table, None
        self._forget_departed()
        return True

    def _leave(self, epoch: str) -> None:
        """(Under the lock.) Refuse `epoch`'s tables from now on; forget those left LEFT_EPOCH_TTL_S ago (no answer
        of theirs can still come) and all but the LEFT_EPOCHS_MAX newest (a controller restarting over and over)."""
        now = time.monotonic()
        self._left_epochs = {e: t for e, t in self._left_epochs.items() if now - t < LEFT_EPOCH_TTL_S}
        self._left_epochs[epoch] = now
        for old in list(self._left_epochs)[:-LEFT_EPOCHS_MAX]:  # in the order left (insertion)
            del self._left_epochs[old]

    def latest(self) -> RoutingTable | None:
        """The newest table known, installed or waiting for the next step."""
        return self._next if self._next is not None else self.table

    def begin_step(self) -> None:
        """Called by the engine before each step: switch to the newest table between steps."""
        self.steps += 1
        with self._lock:
            if self._next is None:
                return
            self.table, self._next = self._next, None
        self._forget_departed()

    def _routed(self) -> tuple[set[str], set[str]]:
        """(Under the lock.) The shard ids and addresses of the installed table and of the one waiting."""
        tables = [t for t in (self.table, self._next) if t is not None]
        return {s for t in tables for s in t.shards}, {a for t in tables for a in t.addresses}

    def _forget_departed(self) -> None:
        """Drop what is kept per shard id (suspicions, token counts) and per address (the transport's channels and
        connections) for shards the installed and waiting tables do not route to: replicas come and go for weeks,
        each under a new id and address. A late failure of a departed shard may add it back; the next table drops
        it again. One thread at a time, each reading the tables as they are then: a set read before another thread
        installed newer tables never runs last (it would close the channels of the shards in use)."""
        with self._forget_lock:
            with self._lock:
                kept, addresses = self._routed()
            for per_shard in (self.suspects, self.shard_tokens):
                for shard_id in list(per_shard):  # list(): other threads add entries meanwhile
                    if shard_id not in kept:
                        per_shard.pop(shard_id, None)
            retain = getattr(self.transport, "retain", None)  # optional for a transport given as an object
            if retain is not None:
                retain(addresses)

    # ----- calls
    @property
    def renewal(self) -> tls.Renewal:
        return self.transport.renewal

    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        return self.transport.stub(address)[0]

    def close(self) -> None:
        """Close the shards' channels and end the failure-reports thread."""
        self.stop_reports()
        self.transport.close()

    def max_call_rows(self, hidden: torch.Tensor, top_k: int, address: str = "") -> int:
        """The most rows [T_s] one call to `address` carries: its request (hidden [T_s, H] as sent, ids and weights)
        and its float64 reply [T_s, H] each within call_limit_bytes and the limit that shard announced (a smaller
        ELASTICMOE_GRPC_MAX_MESSAGE_BYTES where it runs); a shard's share of a bigger step goes in several."""
        return max(1, self.rows_within(hidden, top_k, address))

    def rows_within(self, hidden: torch.Tensor, top_k: int, address: str) -> int:
        """max_call_rows before it sends at least one row: 0 where the limit is below one row (and its overhead)."""
        return max_rows(hidden.shape[1], top_k, hidden.element_size(), COMBINE_DTYPE.itemsize, self.call_limit(address))

    def call_limit(self, address: str) -> int:
        """The largest message of a call to `address`: call_limit_bytes, or the smaller limit that shard announced."""
        return min(self.call_limit_bytes, self.transport.limit(address) or self.call_limit_bytes)

    def row_too_large(self, layer: int, shard_id: str, address: str) -> RowOverLimit:
        """The step's end when even a call of one row is refused as too large: no call can carry the tokens."""
        limit = self.call_limit(address)
        whose = "the gateway's" if limit == self.call_limit_bytes else f"shard {shard_id}'s"
        return RowOverLimit(f"layer {layer}: {whose} ELASTICMOE_GRPC_MAX_MESSAGE_BYTES ({limit} bytes) is below one "
                              f"token's row: no call to {address} can carry one token; raise it")

    @staticmethod
    def short_of_memory(layer: int, answers: dict[str, str]) -> ShortOfMemory:
        """The step's end when the only copies left of some experts are shards out of memory for it."""
        said = "; ".join(f"{s}: {why}" for s, why in answers.items())
        return ShortOfMemory(f"layer {layer}: no copy but on shards out of memory for this step ({said})")

    def send(self, table: RoutingTable, layer: int, shard: int, hidden: torch.Tensor, rows: torch.Tensor,
             ids: torch.Tensor, weights: torch.Tensor, duplicate: bool = False) -> Call:
        """Issue one shard's call on the fan-out pool: hidden [T, H], rows [T_s], ids/weights [T_s, k]; `duplicate`:
        another call counts these slots as routed demand (RunExpertsRequest.duplicate)."""
        call = Call(table.shards[shard], table.addresses[shard], rows, ids, duplicate)

        def build() -> ExpertRequest:  # hidden in the model dtype; each transport encodes it its own way
            return ExpertRequest(layer, hidden.index_select(0, rows), ids.to(torch.int32), weights.float(),
                                 table.version, duplicate=duplicate)

        # the transport's own Future (no second one chained to it: two fewer lock rounds and wake-ups per call);
        # its callback stamps done_at where the answer lands (Step._take stamps it if a waiter got there first)
        call.watch(self.transport.send(table.addresses[shard], build, self.timeout_s))
        return call

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """hidden [T, H], topk_ids [T, k], topk_weights [T, k] -> a pending [T, H]."""
        table = self.table
        if table is None:
            raise NoReplicaError("no routing table yet: expert shards have not registered")
        cpu_hidden, cpu_ids, cpu_weights = to_host(hidden, topk_ids, topk_weights)  # [T, H], [T, k], [T, k]
        step = Step(self, layer, cpu_hidden, cpu_ids, cpu_weights, hidden.device, hidden.dtype)
        step.start(table)
        return step

    @staticmethod
    def unavailable(message: str) -> NoReplicaError:
        return NoReplicaError(message)

    def record(self, overhead_s: float) -> None:
        self.fanout_overhead_s.append(overhead_s)
        if self.on_fanout is not None:
            self.on_fanout(overhead_s)
