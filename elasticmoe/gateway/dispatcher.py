"""The gateway's gRPC dispatcher: per MoE layer, one concurrent call per shard with all of its tokens."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import grpc
import torch

from elasticmoe.model.dispatch import ExpertsUnavailable
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor

log = logging.getLogger(__name__)
_GOLDEN = 0.6180339887498949  # spreads token rows evenly over [0, 1) for splitting a replicated expert


class NoReplicaError(ExpertsUnavailable):
    """No live shard holds an expert the step needs."""


@dataclass(frozen=True)
class RoutingTable:
    """Where every expert of every MoE layer lives, and what share of its tokens each copy takes."""

    version: int
    shards: tuple[str, ...]  # shard index -> shard id
    addresses: tuple[str, ...]  # shard index -> "host:port"
    copies: dict[int, torch.Tensor]  # layer -> [E, C] shard index per copy (-1 = none)
    cum_shares: dict[int, torch.Tensor]  # layer -> [E, C] cumulative shares (last real copy = 1)

    @staticmethod
    def from_dict(d: dict) -> "RoutingTable":
        """From the controller's table: {version, shards: [{id, address}], layers: {layer: [[(shard_idx, share)...] per expert]}}."""
        copies, cums = {}, {}
        for layer, experts in d["layers"].items():
            width = max(1, max(len(c) for c in experts))
            idx = torch.full((len(experts), width), -1, dtype=torch.int64)
            cum = torch.ones((len(experts), width), dtype=torch.float32)
            for e, reps in enumerate(experts):
                acc = 0.0
                for j, (s, share) in enumerate(reps):
                    acc += share
                    idx[e, j], cum[e, j] = s, acc
                if reps:
                    cum[e, len(reps) - 1 :] = 1.0 + 1e-6
            copies[int(layer)], cums[int(layer)] = idx, cum
        return RoutingTable(d["version"], tuple(s["id"] for s in d["shards"]),
                            tuple(s["address"] for s in d["shards"]), copies, cums)

    def assign(self, layer: int, topk_ids: torch.Tensor, exclude: frozenset[int] = frozenset()) -> torch.Tensor:
        """Shard index for every (token, slot) of topk_ids [T, k] (-1 where the id is -1 or no copy is left)."""
        copies, cum = self.copies[layer], self.cum_shares[layer]
        if exclude:
            dead = torch.tensor(sorted(exclude))
            alive = (copies >= 0) & ~torch.isin(copies, dead)
            share = torch.diff(cum, dim=1, prepend=torch.zeros_like(cum[:, :1])) * alive
            total = share.sum(1, keepdim=True)
            cum = torch.where(total > 0, share.cumsum(1) / total.clamp_min(1e-12), cum) + (~alive) * 2.0
            copies = torch.where(alive, copies, -1)
        ids = topk_ids.clamp_min(0)
        t, k = topk_ids.shape
        u = ((torch.arange(t).unsqueeze(1) * _GOLDEN + torch.arange(k) * 0.5) % 1.0)  # [T, k]
        pick = (cum[ids] <= u.unsqueeze(-1)).sum(-1).clamp_max(copies.shape[1] - 1)  # [T, k] copy index
        shard = copies[ids].gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        return torch.where(topk_ids >= 0, shard, -1)


class _Call:
    __slots__ = ("shard", "rows", "ids", "weights", "future", "done_at")

    def __init__(self, shard: int, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, future):
        self.shard, self.rows, self.ids, self.weights, self.future = shard, rows, ids, weights, future
        self.done_at = 0.0


class GrpcDispatcher:
    """Sends each shard, in one gRPC call, the step's tokens routed to it; combines the partial outputs.

    A failed call (dead or slow shard) is re-sent to other copies of the same experts; `on_failure`
    (shard id) may return a new table (e.g. after the controller re-homed orphaned experts).
    """

    remote = True  # dispatch() returns at once: the engine pipelines micro-batches around it

    def __init__(self, timeout_s: float = 5.0, on_failure: Callable[[str], RoutingTable | None] | None = None):
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.table: RoutingTable | None = None
        self._next: RoutingTable | None = None
        self._stubs: dict[str, pb_grpc.ExpertShardStub] = {}
        self._lock = threading.Lock()
        self.fanout_overhead_s: deque[float] = deque(maxlen=4096)  # wait minus shard compute, per (layer, step)
        self.shard_tokens: dict[str, int] = {}
        self.failovers = 0
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fanout")
        self.on_fanout: Callable[[float], None] | None = None  # metrics hook, per (layer, step)

    def set_table(self, table: RoutingTable, now: bool = False) -> None:
        """Install a new routing table: at the next step boundary, or at once (`now`, for failover)."""
        self._next = table
        if now or self.table is None:
            self.table = table

    def begin_step(self) -> None:
        """Called by the engine before each step: switch to the newest table between steps."""
        if self._next is not None:
            self.table, self._next = self._next, None

    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        with self._lock:
            if address not in self._stubs:
                ch = grpc.insecure_channel(address, options=channel_options())
                self._stubs[address] = pb_grpc.ExpertShardStub(ch)
            return self._stubs[address]

    def _send(self, table: RoutingTable, layer: int, shard: int, hidden: torch.Tensor, rows: torch.Tensor,
              ids: torch.Tensor, weights: torch.Tensor) -> _Call:
        """Issue one shard's call on the fan-out pool (blocking stubs: lowest latency from a sync engine thread)."""
        stub = self._stub(table.addresses[shard])
        call = _Call(shard, rows, ids, weights, None)

        def run():
            req = pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden[rows]),
                                       topk_ids=encode_tensor(ids.to(torch.int32)),
                                       topk_weights=encode_tensor(weights.float()), placement_version=table.version)
            resp = stub.RunExperts(req, timeout=self.timeout_s)
            call.done_at = time.perf_counter()
            return resp

        call.future = self._pool.submit(run)
        return call

    def _fan_out(self, table: RoutingTable, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, exclude: frozenset[int] = frozenset()) -> list[_Call]:
        shard_of = table.assign(layer, topk_ids, exclude)  # [T, k]
        if bool((shard_of < 0).logical_and(topk_ids >= 0).any()):
            raise NoReplicaError(f"layer {layer}: some experts have no live copy")
        calls = []
        for s in shard_of[shard_of >= 0].unique().tolist():
            mine = shard_of == s  # [T, k]
            rows = mine.any(1).nonzero().squeeze(1)  # [T_s]
            ids = torch.where(mine, topk_ids, -1)[rows]
            calls.append(self._send(table, layer, s, hidden, rows, ids, topk_weights[rows]))
        return calls

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """hidden [T, H], topk_ids [T, k], topk_weights [T, k] -> a pending [T, H]."""
        table = self.table
        if table is None:
            raise NoReplicaError("no routing table yet: expert shards have not registered")
        t0 = time.perf_counter()
        cpu_hidden, ids, weights = hidden.cpu(), topk_ids.cpu(), topk_weights.cpu()
        return _Pending(self, table, layer, hidden, cpu_hidden, ids, weights,
                        self._fan_out(table, layer, cpu_hidden, ids, weights), t0)


class _Pending:
    def __init__(self, d: GrpcDispatcher, table: RoutingTable, layer: int, hidden: torch.Tensor,
                 cpu_hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, calls: list[_Call],
                 t0: float):
        self.d, self.table, self.layer, self.hidden, self.cpu_hidden = d, table, layer, hidden, cpu_hidden
        self.topk_ids, self.topk_weights, self.calls, self.t0 = topk_ids, topk_weights, calls, t0

    def wait(self) -> torch.Tensor:
        """Collect every shard's partial output, re-sending failed shards' tokens to surviving copies."""
        out = torch.zeros(self.cpu_hidden.shape, dtype=torch.float32)
        calls, dead = self.calls, frozenset()
        compute, finished = 0.0, self.t0
        for _attempt in range(4):
            failed = False
            for c in calls:
                try:
                    resp = c.future.result()
                except grpc.RpcError as e:
                    log.warning("shard %s failed at layer %d: %s", self.table.shards[c.shard], self.layer, e.code())
                    dead, failed = dead | {c.shard}, True
                    self._report(c.shard)
                    continue
                if resp.missing:  # placement changed under us: ask another copy
                    dead, failed = dead | {c.shard}, True
                    continue
                out.index_add_(0, c.rows, decode_tensor(resp.output, "output").float())
                compute = max(compute, resp.compute_us / 1e6)
                finished = max(finished, c.done_at or time.perf_counter())
                self.d.shard_tokens[self.table.shards[c.shard]] = (
                    self.d.shard_tokens.get(self.table.shards[c.shard], 0) + int(c.rows.numel()))
            if not failed:
                break
            self.d.failovers += 1
            ids = torch.full_like(self.topk_ids, -1)
            for c in calls:
                if c.shard in dead:
                    ids[c.rows] = torch.where(c.ids >= 0, c.ids, ids[c.rows])
            if self.d.table is not None and self.d.table.version != self.table.version:
                self.table, dead = self.d.table, frozenset()  # the controller re-placed: fresh start
            calls = self.d._fan_out(self.table, self.layer, self.cpu_hidden, ids, self.topk_weights, dead)
        else:
            raise NoReplicaError(f"layer {self.layer}: experts unavailable after 4 attempts")
        overhead = max(0.0, (finished - self.t0) - compute)
        self.d.fanout_overhead_s.append(overhead)
        if self.d.on_fanout is not None:
            self.d.on_fanout(overhead)
        return out.to(device=self.hidden.device, dtype=self.hidden.dtype)

    def _report(self, shard: int) -> None:
        if self.d.on_failure is not None:
            new = self.d.on_failure(self.table.shards[shard])
            if new is not None:
                self.d.set_table(new, now=True)
