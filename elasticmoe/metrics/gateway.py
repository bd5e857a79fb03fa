"""One gateway's (or the controller's) metrics: in-process totals, cheap hot-path expert counting, flushed to Ray."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from elasticmoe.metrics.series import ray_metrics

if TYPE_CHECKING:  # imported where routes are counted (a gateway): the controller's replica imports no torch
    import torch

EXPERT_METRIC_MODES = ("per_expert", "per_layer", "off")
PLACEMENT_REASONS = ("rebalance", "scale_out", "scale_in", "rehome")  # why a placement change was applied
log = logging.getLogger("elasticmoe.metrics")  # the package's: what logging configs (and tests) name


def log_this_time(n: int) -> bool:
    """Whether the n-th repeat of one failure is logged: the 1st, 10th, 100th and every 1000th (a failure that
    repeats every step or second would flood the log)."""
    return n in (1, 10, 100) or n % 1000 == 0


class GatewayMetrics:
    """One gateway's metrics. Exports to Ray when it is initialised at construction; always keeps in-process totals.

    `route` and `fanout` run on the engine thread once per MoE layer per step: they only accumulate
    (a tensor add / a list append under a lock). Exports to Ray happen at most every `flush_interval_s`
    from a daemon thread (or on `flush()`), so Ray's per-call cost is paid per series, never per token.
    With expert_metrics="per_layer", `expert_tokens_total` / `expert_copies` carry expert="all";
    with "off" neither is exported (in-process totals of routed tokens are not kept either).
    """

    def __init__(self, expert_metrics: str, num_layers: int, num_experts: int, moe_layers: list[int],
                 flush_interval_s: float = 1.0, use_ray: bool | None = None):
        if expert_metrics not in EXPERT_METRIC_MODES:
            raise ValueError(f"expert_metrics: must be one of {EXPERT_METRIC_MODES}, got {expert_metrics!r}")
        self.mode, self.num_layers, self.num_experts = expert_metrics, num_layers, num_experts
        self.moe_layers = list(moe_layers)
        self.flush_interval_s = flush_interval_s
        self._ray = ray_metrics() if use_ray is not False else None
        self._lock = threading.Lock()
        self._acc: torch.Tensor | None = None  # [layers, experts] int64, on the device of topk_ids
        self._totals = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._exported = np.zeros_like(self._totals)  # the part of _totals already sent to Ray
        self._fanout: list[float] = []
        # the per-request counters below are counted from several event loops (Serve's, the direct_grpc port's):
        # their read-modify-writes and counts()'s copies happen under _counts_lock (once per request, never per token)
        self._counts_lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.errors: dict[str, int] = {}
        self.latency_counts = {"ttft": 0, "tpot": 0, "e2e": 0}
        self.gauges: dict[str, float] = {}
        # the engine's running totals, as the Ray counters of these names count them: prompt tokens looked up in the
        # prefix cache and found there, running sequences preempted for KV-cache blocks
        self.totals = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        self.expert_copies: dict[tuple[int, int], int] = {}
        self.layer_copies: dict[int, int] = {}  # layer -> sum of its experts' copies (kept with expert_copies)
        self.shards: dict[str, bool] = {}
        self.rebalance_events = self.rebalance_bytes = 0
        self.rebalance_reasons: dict[str, int] = {}  # placement changes applied, by reason (PLACEMENT_REASONS)
        self.flush_errors = 0  # flushes (the background thread's, close()'s) that raised: logged, counted, survived
        self._stop = threading.Event()
        if self._ray is not None:
            threading.Thread(target=self._flush_loop, name="metrics-flush", daemon=True).start()

    @property
    def exporting(self) -> bool:
        """True when values go to Ray's Prometheus endpoint (Ray was initialised at construction)."""
        return self._ray is not None

    # --- per request (event loop) -------------------------------------------------------------

    def request(self, api: str, status: str) -> None:
        """Count a finished request: api grpc|http, status ok|invalid|unauthenticated|rejected|cancelled|error
        (cancelled: the client went away first, by a disconnect, a cancel or its deadline)."""
        with self._counts_lock:
            self.requests[(api, status)] = self.requests.get((api, status), 0) + 1
        if self._ray:
            self._ray["requests"].inc(1, {"api": api, "status": status})

    def error(self, code: str) -> None:
        """Count a failed request by error code (an HTTP status or gRPC code name)."""
        with self._counts_lock:
            self.errors[str(code)] = self.errors.get(str(code), 0) + 1
        if self._ray:
            self._ray["errors"].inc(1, {"code": str(code)})

    def _observe(self, name: str, seconds: float) -> None:
        with self._counts_lock:
            self.latency_counts[name] += 1
        if self._ray:
            self._ray[name].observe(float(seconds))

    def counts(self) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, int]]:
        """Copies of (requests, errors, latency_counts) taken together: safe to iterate while other threads count."""
        with self._counts_lock:
            return dict(self.requests), dict(self.errors), dict(self.latency_counts)

    def ttft(self, seconds: float) -> None:
        """Observe a time to first token."""
        self._observe("ttft", seconds)

    def tpot(self, seconds: float) -> None:
        """Observe a choice's mean time per output token after its first (one per choice of an n > 1 request)."""
        self._observe("tpot", seconds)

    def e2e(self, seconds: float) -> None:
        """Observe a request's end-to-end latency."""
        self._observe("e2e", seconds)

    # --- engine, control plane -----------------------------------------------------------------

    def engine(self, running: int, queued: int, kv_usage: float) -> None:
        """Set the batch gauges; kv_usage = KV-cache slots not free / total slots (KV_USAGE_HELP)."""
        self.gauges.update(running=running, queued=queued, kv_usage=kv_usage)
        if self._ray:
            self._ray["running"].set(running)
            self._ray["queued"].set(queued)
            self._ray["kv"].set(float(kv_usage))

    def engine_from(self, scheduler: Any) -> None:
        """Set the batch gauges from an engine's scheduler: running, waiting, and the KV cache's use: the larger of
        the share of its slots not free (a running sequence's, or one the engine holds back until it is zeroed:
        Engine.held_slots, used, not free) and the share of its blocks reserved (scheduler.pool; a sequence
        holds its tokens' blocks), whichever stops admission first."""
        total = max(1, scheduler.num_slots)
        usage = (total - len(scheduler.free_slots)) / total
        pool = getattr(scheduler, "pool", None)
        if pool is not None:
            usage = max(usage, (pool.num_blocks - pool.num_free) / pool.num_blocks)
            self.engine_totals(prefix_queries=pool.queried_tokens, prefix_hits=pool.hit_tokens)
        self.engine_totals(preemptions=getattr(scheduler, "preemptions", 0))
        self.engine(len(scheduler.running), len(scheduler.waiting), usage)

    def engine_totals(self, **totals: int) -> None:
        """The engine's running totals (BlockPool.queried_tokens and hit_tokens, Scheduler.preemptions): each Ray
        counter goes up by what its total grew since the last call."""
        for key, total in totals.items():
            grew, self.totals[key] = total - self.totals[key], total
            if self._ray and grew > 0:
                self._ray[key].inc(grew)

    @property
    def prefix_cache(self) -> dict[str, int]:
        return {"queries": self.totals["prefix_queries"], "hits": self.totals["prefix_hits"]}

    @property
    def preemptions(self) -> int:
        return self.totals["preemptions"]

    def copies(self, layer: int, expert: int, n: int) -> None:
        """Set the number of live copies of (layer, expert); O(1) (the layer's sum is kept, not recounted)."""
        with self._lock:
            per_layer = self._set_copy_locked(layer, expert, int(n))
        if not self._ray or self.mode == "off":
            return
        if self.mode == "per_expert":
            self._ray["copies"].set(n, {"layer": str(layer), "expert": str(expert)})
        else:
            self._ray["copies"].set(per_layer, {"layer": str(layer), "expert": "all"})

    def set_copies(self, layers: list[int], counts: np.ndarray) -> None:
        """Set every expert's live copies at once: counts [len(layers), E] int; O(L*E), one Ray call per series."""
        counts = np.asarray(counts, dtype=np.int64).reshape(len(layers), -1)  # [L, E]
        rows = counts.tolist()
        with self._lock:
            for layer, row in zip(layers, rows):
                for e, n in enumerate(row):
                    self._set_copy_locked(layer, e, n)
        if not self._ray or self.mode == "off":
            return
        gauge = self._ray["copies"]
        for layer, row in zip(layers, rows):
            if self.mode == "per_expert":
                for e, n in enumerate(row):
                    gauge.set(n, {"layer": str(layer), "expert": str(e)})
            else:
                gauge.set(sum(row), {"layer": str(layer), "expert": "all"})

    def _set_copy_locked(self, layer: int, expert: int, n: int) -> int:
        """Record one expert's copies and return its layer's new total (caller holds the lock)."""
        old = self.expert_copies.get((layer, expert), 0)
        self.expert_copies[(layer, expert)] = n
        self.layer_copies[layer] = self.layer_copies.get(layer, 0) - old + n
        return self.layer_copies[layer]

    def balancedness(self, layer: int, value: float) -> None:
        """Set a layer's balancedness (mean over max shard load; 1 = perfectly even)."""
        self.gauges[f"balancedness/{layer}"] = value
        if self._ray:
            self._ray["balancedness"].set(float(value), {"layer": str(layer)})

    def set_shard_health(self, health: dict[str, bool]) -> None:
        """Set whether each registered expert shard is healthy; a shard missing from `health` (it left) is
        forgotten, and its series set to 0 once (a Ray gauge cannot drop a series: it kept its last value), its
        elasticmoe_shard_registered too, so that dashboards tell it from a registered shard that does not answer."""
        gone = set(self.shards) - set(health)
        self.shards = {sid: bool(ok) for sid, ok in health.items()}
        if self._ray:
            for sid in gone:
                self._ray["shard_healthy"].set(0.0, {"shard": sid})
                self._ray["shard_registered"].set(0.0, {"shard": sid})
            for sid, ok in health.items():
                self._ray["shard_healthy"].set(1.0 if ok else 0.0, {"shard": sid})
                self._ray["shard_registered"].set(1.0, {"shard": sid})

    def rebalance(self, nbytes: int, reason: str = "rebalance") -> None:
        """Count one applied placement change that loaded `nbytes` of expert weights; reason: one of
        PLACEMENT_REASONS (rebalance: the planner's; scale_out; scale_in: a drain; rehome: after a shard was lost)."""
        if reason not in PLACEMENT_REASONS:
            raise ValueError(f"reason: must be one of {PLACEMENT_REASONS}, got {reason!r}")
        self.rebalance_events += 1
        self.rebalance_bytes += int(nbytes)
        self.rebalance_reasons[reason] = self.rebalance_reasons.get(reason, 0) + 1
        if self._ray:
            self._ray["rebalance_events"].inc(1, {"reason": reason})
            if nbytes > 0:
                self._ray["rebalance_bytes"].inc(int(nbytes), {"reason": reason})

    # --- hot path (engine thread) --------------------------------------------------------------

    def route(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count a step's routing decisions at `layer`: topk_ids [T, k], ids in [0, num_experts), -1 ignored.

        No host sync and no Ray call: a scatter-add into a [layers, experts] tensor on topk_ids' device.
        """
        if self.mode == "off" or topk_ids.numel() == 0:
            return
        import torch  # loaded already by whoever made topk_ids

        ids = topk_ids.reshape(-1).long()
        if ids.device.type == "cpu" and int(ids.min()) < 0:  # on GPU, checking would sync: ids must be valid
            ids = ids[ids >= 0]
        ones = torch.ones_like(ids)
        with self._lock, torch.inference_mode():  # the engine runs in inference mode: keep _acc an inference tensor
            if self._acc is not None and self._acc.device != ids.device:
                self._drain_locked()
            if self._acc is None:
                self._acc = torch.zeros((self.num_layers, self.num_experts), dtype=torch.int64, device=ids.device)
            self._acc[layer].scatter_add_(0, ids, ones)

    def fanout(self, seconds: Iterable[float]) -> None:
        """Record one step's expert fan-out overhead per MoE layer (exported in the next flush)."""
        with self._lock:
            if self._ray is not None:
                self._fanout.extend(float(s) for s in seconds)

    # --- flushing ------------------------------------------------------------------------------

    def _drain_locked(self) -> None:
        """Move the pending counts into the in-process totals (caller holds the lock).

        Swaps the accumulator out rather than zeroing it: it is an inference tensor, read-only outside
        inference mode; route() allocates a fresh one.
        """
        if self._acc is not None:
            self._totals += self._acc.cpu().numpy()
            self._acc = None

    def flush(self) -> None:
        """Export pending expert counts and fan-out observations to Ray (no-op without Ray)."""
        with self._lock:
            self._drain_locked()
            delta = self._totals - self._exported
            self._exported = self._totals.copy()
            fanout, self._fanout = self._fanout, []
        if self._ray is None:
            return
        counter = self._ray["expert_tokens"]
        if self.mode == "per_expert":
            for layer, expert in zip(*np.nonzero(delta)):
                counter.inc(int(delta[layer, expert]), {"layer": str(layer), "expert": str(expert)})
        elif self.mode == "per_layer":
            for layer, n in enumerate(delta.sum(axis=1).tolist()):
                if n:
                    counter.inc(int(n), {"layer": str(layer), "expert": "all"})
        hist = self._ray["fanout"]
        for s in fanout:
            hist.observe(s)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self._guarded_flush()

    def _guarded_flush(self) -> None:
        """flush(), whose failure (Ray's export, a device copy) is counted in flush_errors and logged (the 1st,
        10th, 100th and every 1000th: once a second it would flood the log), never the caller's end."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - metrics must never take the gateway down
            self.flush_errors += 1
            if log_this_time(self.flush_errors):
                log.exception("exporting metrics to Ray raised (%d times so far)", self.flush_errors)

    def expert_token_totals(self) -> np.ndarray:
        """Tokens routed to each expert so far: int64 [num_layers, num_experts] (a copy)."""
        with self._lock:
            self._drain_locked()
            return self._totals.copy()

    def close(self) -> None:
        """Stop the flush thread after a last flush."""
        self._stop.set()
        self._guarded_flush()
