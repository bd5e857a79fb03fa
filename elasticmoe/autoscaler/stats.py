"""The controller's stats round and its status answer: shard load, the desired shard count, placement metrics."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.autoscaler.backoff import Backoffs
from elasticmoe.autoscaler.moves import GATEWAY_TTL_S
from elasticmoe.autoscaler.policy import LoadTracker, ScaleDecider
from elasticmoe.autoscaler.registry import Registry

UNMEASURED_ROUNDS = 3  # more than a missed read and the baseline read after it


class StatsKeeper:
    """Mixin of the Controller: reads the live shards' counters into the load tracker, the shard count and the
    metrics, and answers `status()`. Needs the Controller's and Mover's state (`registry`, `load`, `scale`,
    `desired`, `metrics`, `moe_layers`, `layer_index`, `backoffs`, `_stats`, `_shard_stats`, `_save`)."""

    registry: Registry
    backoffs: Backoffs
    load: LoadTracker
    scale: ScaleDecider | None
    desired: int
    moe_layers: list[int]
    _exported_version = -1  # the table version whose live copies the metrics show
    _unmeasured: dict[str, int] = {}  # live shard id -> stats rounds in a row that did not measure it (replaced)

    async def status(self) -> dict:
        """Placement version, per-shard health and load, balancedness per layer, hottest experts, events; `copies`
        ([L, E]) and each shard's `sole_copies` count live copies (those the table routes to), not a dead shard's."""
        load = self.load.planning_load()
        shards, p = [], self.registry.placement
        copies = self.registry.live_copies()  # [L, E] copies the table routes to (a dead shard's are none)
        live = {s.shard_id for s in self.registry.live()}
        infos = sorted(self.registry.shards.values(), key=lambda s: s.position)
        # every shard asked at once: a shard that does not answer costs one timeout, not one each
        answers = await asyncio.gather(*(self._shard_stats(s.address) for s in infos))
        for s, answer in zip(infos, answers):
            mine = p.experts_on(s.position) if s.position < p.num_shards else []
            entry = {"id": s.shard_id, "address": s.address, "position": s.position, "ready": s.ready,
                     "healthy": s.healthy, "experts": len(mine),
                     # experts of which it holds the only live copy: lost with this shard (none held if not live)
                     "sole_copies": sum(1 for l, e in mine if copies[l, e] == 1) if s.shard_id in live else 0,
                     "utilization": self.load.utilization.get(s.shard_id, 0.0), **answer}
            if s.load_error:  # its plan's experts cannot be read (Controller.plan_failed): it is not ready
                entry["load_error"] = s.load_error
            shards.append(entry)
        return {"version": self.registry.version, "complete": self.registry.complete(), "shards": shards,
                "num_shards": p.num_shards, "desired_shards": self.desired, "recovering": self.recovering,
                "balancedness": p.balancedness(load).tolist(), "load": self.load.ema.tolist(),
                "planning_load": load.tolist(),  # [L, E] what the balancedness above is computed with
                "moe_layers": self.moe_layers, "copies": copies.tolist(),  # [L, E] live, as sole_copies and the metric
                "bytes_moved": self.bytes_moved,
                "event_counts": dict(self.event_counts), "loop_errors": self.loop_errors,
                "metrics_flush_errors": self.metrics.flush_errors,
                "undropped": {s: len(pairs) for s, pairs in self._undropped.items()},  # copies a failed drop left
                "retrying": self.backoffs.view(),  # failing re-homes, scale outs, revivals: why, and the next try
                "gateways": {g: v for g, (v, t) in self.acks.items() if time.monotonic() - t < GATEWAY_TTL_S},
                "events": self.events[-50:]}

    async def _stats_once(self) -> None:
        stats, uptime, live = {}, {}, self.registry.live()
        for s, st in zip(live, await asyncio.gather(*(self._stats(s.address) for s in live))):  # at once, as status
            if st is not None:
                stats[s.shard_id], uptime[s.shard_id] = (routed_demand(st), _busy_s(st)), st.uptime_s
        self.load.update(stats, self.layer_index, unread=[s.shard_id for s in live if s.shard_id not in stats],
                         uptime=uptime)
        self._export(stats)
        if self.scale is not None:
            if self.registry.staffed() and not self.recovering and self.scale.started():
                self._save()  # a restart resumes the warm-up (not a new one)
            live = [s.shard_id for s in self.registry.live()]
            self._unmeasured = {s: 0 if s in self.load.measured else self._unmeasured.get(s, 0) + 1 for s in live}
            # a live shard not measured over this interval (read for the first time, or its read failed) is not idle:
            # no decision this round; one unmeasured for UNMEASURED_ROUNDS (its GetStats keeps failing) counts as busy
            # as the busiest measured shard, rather than stopping every decision for good
            util = [self.load.utilization[s] for s in live if s in self.load.measured]
            stale = sum(1 for s in live if self._unmeasured[s] >= UNMEASURED_ROUNDS)
            util = util + [max(util)] * stale if util and len(util) + stale == len(live) else []
            desired = self.scale.desired(self.desired, util)
            if desired != self.desired:
                self.desired = desired
                self._save()

    def _export(self, stats: dict) -> None:
        """Placement metrics: balancedness per layer, copies per expert, shard health, loop errors."""
        placement = self.registry.placement
        for i, b in enumerate(placement.balancedness(self.load.planning_load())):
            self.metrics.balancedness(self.moe_layers[i], float(b))
        if self._exported_version != self.registry.version:  # live copies change only with a new table version
            self._exported_version = self.registry.version
            self.metrics.set_copies(self.moe_layers, self.registry.live_copies())  # [L, E], O(L*E*N)
        live = {s.shard_id for s in self.registry.live()}
        # live: answered GetStats; loading or spare: the health check; a shard no longer registered is dropped
        self.metrics.set_shard_health({s.shard_id: s.shard_id in stats if s.shard_id in live else s.healthy
                                       for s in self.registry.shards.values()})


def routed_demand(st) -> dict[tuple[int, int], int]:
    """A GetStats answer's routed demand, {(model layer, expert): token-slots}: its `tokens` (the work served) less
    its `duplicates` (hedges and re-sends whose slots another call counted), so a slot the router assigned counts
    once however many copies computed it. The per-expert load plans where copies go and how tokens are shared among
    them: a hedge's second copy is not more demand for that expert (the time it took is in busy_us, which the shard
    count follows). A shard that predates `duplicates` answers none: its tokens, hedges included."""
    out = {(t.layer, t.expert): t.tokens for t in st.tokens}
    for t in st.duplicates:
        key = (t.layer, t.expert)
        out[key] = out.get(key, 0) - t.tokens
    return out


def _busy_s(st) -> float:
    """A GetStats answer's busy seconds: busy_us, the union of its calls' compute times (a busy fraction of at most 1);
    from a shard that predates it (a redeploy in progress), compute_us, their sum, which overlapping calls inflate."""
    return (st.busy_us if st.HasField("busy_us") else st.compute_us) / 1e6
