"""The controller deployment: shard registry, placement versions, live re-placement, failover and scaling."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
from ray import serve

from elasticmoe.autoscaler.policy import LoadTracker, ScaleDecider
from elasticmoe.autoscaler.registry import Registry
from elasticmoe.config import AppArgs
from elasticmoe.placement import Placement, plan
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc.codec import channel_options

log = logging.getLogger("elasticmoe.controller")


def default_slots(num_experts: int, num_shards: int) -> int:
    """Expert slots per (shard, layer): an even split plus 25% headroom for hot-expert copies."""
    even = -(-num_experts // num_shards)
    return min(num_experts, even + max(1, even // 4))


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Controller:
    """Owns the placement. Gateways poll `table()`; shards `register()`; loops track load and health."""

    def __init__(self, args: dict):
        from elasticmoe.model import open_model

        self.args = AppArgs.model_validate(args)
        spec = open_model(self.args.model).spec
        self.moe_layers = spec.moe.moe_layers
        self.layer_index = {l: i for i, l in enumerate(self.moe_layers)}
        self.num_experts = spec.moe.num_experts
        auto = self.args.autoscaling
        n = self.args.num_shards
        self.slots = (auto.slots_per_shard if auto else None) or default_slots(self.num_experts, n)
        self.max_moves = auto.max_moves if auto else 8
        self.registry = Registry(Placement.even(len(self.moe_layers), self.num_experts, n, self.slots), self.moe_layers)
        self.load = LoadTracker(len(self.moe_layers), self.num_experts)
        self.scale = ScaleDecider(auto.min_shards, auto.max_shards, auto.target_utilization) if auto else None
        self.desired = n
        self._stubs: dict[str, pb_grpc.ExpertShardStub] = {}
        self._tasks: list[asyncio.Task] = []
        self._lock: asyncio.Lock | None = None
        self.events: list[dict] = []
        self.event_counts: dict[str, int] = {}
        self.bytes_moved = 0
        from elasticmoe.gateway.metrics import GatewayMetrics

        self._exported_version = -1
        self.metrics = GatewayMetrics(self.args.expert_metrics, spec.num_layers, self.num_experts, self.moe_layers)

    # ----- plumbing
    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        if address not in self._stubs:
            self._stubs[address] = pb_grpc.ExpertShardStub(grpc.aio.insecure_channel(address, options=channel_options()))
        return self._stubs[address]

    def _start(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._health_loop()), loop.create_task(self._stats_loop())]
            if self.args.autoscaling:
                self._tasks.append(loop.create_task(self._rebalance_loop()))
        return self._lock

    def _event(self, kind: str, **kw) -> None:
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        self.events.append({"t": time.time(), "event": kind, "version": self.registry.version, **kw})
        del self.events[:-500]
        log.info("%s %s", kind, kw)

    # ----- shard lifecycle
    async def register(self, shard_id: str, address: str) -> dict:
        """A shard replica announces itself; returns its position and the experts it must load."""
        self._start()
        info = self.registry.register(shard_id, address)
        return {"position": info.position, "experts": self.registry.assignment(info.position),
                "version": self.registry.version}

    async def ready(self, shard_id: str) -> int:
        """The shard loaded its experts: publish it; a spare replica grows the placement onto itself."""
        lock = self._start()
        self.registry.mark_ready(shard_id)
        self._event("ready", shard=shard_id)
        info = self.registry.shards.get(shard_id)
        if info is not None and info.position >= self.registry.placement.num_shards:
            async with lock:
                await self._grow()
        return self.registry.version

    async def drain(self, shard_id: str) -> dict:
        """Scale-in: move this shard's experts onto the others, publish, then let it go."""
        async with self._start():
            await self._lose(shard_id, "drained")
        await asyncio.sleep(1.0)  # gateways switch tables between steps
        return self.registry.table()

    async def report_failure(self, shard_id: str) -> dict:
        """A gateway's call to this shard failed: check it now; if dead, re-home its experts; return the table."""
        async with self._start():
            info = self.registry.shards.get(shard_id)
            if info is not None and not await self._alive(info.address):
                await self._lose(shard_id, "call failed")
        return self.registry.table()

    async def _lose(self, shard_id: str, why: str) -> None:
        info = self.registry.remove(shard_id)
        if info is None:
            return
        self._event("removed", shard=shard_id, why=why)
        n = self.registry.placement.num_shards
        if info.position >= n or n == 1:
            return  # a spare, or the last shard: its replacement takes the free position
        current = self.registry.retire(info.position)
        slots = max(self.slots, math.ceil(self.num_experts / (n - 1)))
        new = plan(self.load.planning_load(), n - 1, slots, current=current, max_moves=self.max_moves)
        await self._apply(current, new, reason=f"re-home after {why}")

    async def _grow(self) -> None:
        """Give each ready spare replica the next position and move experts onto it (scale out)."""
        n = self.registry.placement.num_shards
        for spare in [s for s in self.registry.shards.values() if s.ready and s.position >= n]:
            cur = self.registry.placement
            spare.position = cur.num_shards
            new = plan(self.load.planning_load(), cur.num_shards + 1, self.slots, current=cur,
                       max_moves=max(self.max_moves, self.slots))
            await self._apply(cur, new, reason="scale out")

    async def _apply(self, current: Placement, new: Placement, reason: str) -> None:
        """Load added copies on their shards while serving, publish the new version, drop old copies later."""
        added, removed = current.diff(new)  # (layer, expert, shard) copies; works across a change of shard count
        owners = self.registry.by_position()
        loads: dict[int, list[tuple[int, int]]] = {}
        for l, e, s in added:
            loads.setdefault(s, []).append((self.moe_layers[l], e))
        results = await asyncio.gather(*(self._load(owners[s].address, pairs) for s, pairs in loads.items()
                                         if s in owners))
        moved = sum(results)
        self.bytes_moved += moved
        self.metrics.rebalance(moved)
        self.registry.set_placement(new)
        self._event("placement", reason=reason, moves=len(added), dropped=len(removed), bytes=moved)
        drops: dict[str, list[tuple[int, int]]] = {}
        for l, e, s in removed:
            if s in owners:
                drops.setdefault(owners[s].address, []).append((self.moe_layers[l], e))
        if drops:
            asyncio.get_running_loop().create_task(self._drop_later(drops))

    async def _load(self, address: str, pairs: list[tuple[int, int]]) -> int:
        req = pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs],
                                    placement_version=self.registry.version + 1)
        resp = await self._stub(address).LoadExperts(req, timeout=120)
        return resp.bytes

    async def _drop_later(self, drops: dict[str, list[tuple[int, int]]], grace_s: float = 3.0) -> None:
        await asyncio.sleep(grace_s)  # in-flight steps on the old version finish first
        for address, pairs in drops.items():
            try:
                await self._stub(address).DropExperts(
                    pb.DropExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs]), timeout=30)
            except grpc.RpcError as e:
                log.warning("drop on %s failed: %s", address, e.code())

    # ----- gateway and operator API
    async def table(self, known_version: int = -1) -> dict | None:
        """The routing table, or None when the caller's version is current."""
        self._start()
        if known_version == self.registry.version:
            return None
        return self.registry.table()

    async def desired_shards(self) -> int:
        return self.desired

    async def set_target_shards(self, n: int | None) -> int:
        """Operator override of the shard count (None: back to utilization-based autoscaling)."""
        if self.scale is None:
            raise ValueError("autoscaling is not configured for this app (args.autoscaling)")
        self.scale.override = n
        self.desired = self.scale.desired(self.desired, [])
        return self.desired

    async def rebalance(self) -> dict:
        """Re-plan now from the measured load (bounded moves); returns the event."""
        async with self._start():
            cur = self.registry.placement
            new = plan(self.load.planning_load(), cur.num_shards, cur.slots_per_shard, current=cur,
                       max_moves=self.max_moves)
            if cur.diff(new)[0]:
                await self._apply(cur, new, reason="rebalance")
        return self.events[-1] if self.events else {}

    async def status(self) -> dict:
        """Placement version, per-shard health and load, balancedness per layer, hottest experts, events."""
        load = self.load.planning_load()
        bal = self.registry.placement.balancedness(load).tolist()
        shards = []
        for s in sorted(self.registry.shards.values(), key=lambda s: s.position):
            entry = {"id": s.shard_id, "address": s.address, "position": s.position, "ready": s.ready,
                     "healthy": s.healthy, "experts": len(self.registry.assignment(s.position)),
                     "utilization": self.load.utilization.get(s.shard_id, 0.0)}
            entry.update(await self._shard_stats(s.address))
            shards.append(entry)
        return {"version": self.registry.version, "complete": self.registry.complete(), "shards": shards,
                "num_shards": self.registry.placement.num_shards, "desired_shards": self.desired,
                "balancedness": bal, "load": self.load.ema.tolist(), "moe_layers": self.moe_layers,
                "copies": self.registry.placement.num_copies().tolist(), "bytes_moved": self.bytes_moved,
                "event_counts": dict(self.event_counts),
                "events": self.events[-50:]}

    # ----- loops
    async def _shard_stats(self, address: str) -> dict:
        try:
            r = await self._stub(address).GetStats(pb.GetStatsRequest(), timeout=2.0)
        except grpc.RpcError as e:
            return {"stats_error": str(e.code())}
        return {"tokens": sum(t.tokens for t in r.tokens), "calls": r.calls, "weight_bytes": r.weight_bytes,
                "compute_s": r.compute_us / 1e6, "held": len(r.held),
                "expert_tokens": [[t.layer, t.expert, t.tokens] for t in r.tokens]}

    async def _alive(self, address: str, timeout: float = 2.0) -> bool:
        for _ in range(2):
            try:
                if (await self._stub(address).Health(pb.HealthRequest(), timeout=timeout)).ok:
                    return True
            except grpc.RpcError:
                await asyncio.sleep(0.2)
        return False

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for info in list(self.registry.shards.values()):
                if info.ready and not await self._alive(info.address):
                    async with self._lock:
                        await self._lose(info.shard_id, "health check failed")

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            stats = {}
            for s in self.registry.live():
                try:
                    r = await self._stub(s.address).GetStats(pb.GetStatsRequest(), timeout=2.0)
                except grpc.RpcError:
                    continue
                stats[s.shard_id] = ({(t.layer, t.expert): t.tokens for t in r.tokens}, r.compute_us / 1e6)
            self.load.update(stats, self.layer_index)
            self._export(stats)
            if self.scale is not None:
                util = [self.load.utilization.get(s.shard_id, 0.0) for s in self.registry.live()]
                self.desired = self.scale.desired(self.desired, util)

    def _export(self, stats: dict) -> None:
        """Placement metrics: balancedness per layer, copies per expert, shard health."""
        placement = self.registry.placement
        for i, b in enumerate(placement.balancedness(self.load.planning_load())):
            self.metrics.balancedness(self.moe_layers[i], float(b))
        if self._exported_version != self.registry.version:  # copies change only with the placement
            self._exported_version = self.registry.version
            for i, row in enumerate(placement.num_copies()):
                for e, n in enumerate(row):
                    self.metrics.copies(self.moe_layers[i], e, int(n))
        for s in self.registry.shards.values():
            self.metrics.shard_health(s.shard_id, s.shard_id in stats)

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.autoscaling.rebalance_interval_s)
            try:
                await self.rebalance()
            except Exception:  # noqa: BLE001 - keep serving on the current placement
                log.exception("rebalance failed")

