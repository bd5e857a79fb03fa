"""The controller deployment: shard registry, numbered placement versions, health checks of expert shards."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from ray import serve

from elasticmoe.autoscaler.registry import Registry
from elasticmoe.config import AppArgs
from elasticmoe.placement import Placement
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
    """Keeps the registry of expert shards and the placement; gateways poll `table()` between steps."""

    def __init__(self, args: dict):
        from elasticmoe.model import open_model

        self.args = AppArgs.model_validate(args)
        spec = open_model(self.args.model).spec
        self.moe_layers = spec.moe.moe_layers
        self.num_experts = spec.moe.num_experts
        n = self.args.num_shards
        slots = (self.args.autoscaling.slots_per_shard if self.args.autoscaling else None) or default_slots(
            self.num_experts, n)
        self.registry = Registry(Placement.even(len(self.moe_layers), self.num_experts, n, slots), self.moe_layers)
        self._stubs: dict[str, pb_grpc.ExpertShardStub] = {}
        self._health_task: asyncio.Task | None = None
        self.events: list[dict] = []

    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        if address not in self._stubs:
            self._stubs[address] = pb_grpc.ExpertShardStub(grpc.aio.insecure_channel(address, options=channel_options()))
        return self._stubs[address]

    def _ensure_health_loop(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def register(self, shard_id: str, address: str) -> dict:
        """A shard replica announces itself; returns its position and the experts it must load."""
        self._ensure_health_loop()
        info = self.registry.register(shard_id, address)
        log.info("shard %s at %s takes position %d", shard_id, address, info.position)
        return {"position": info.position, "experts": self.registry.assignment(info.position),
                "version": self.registry.version}

    async def ready(self, shard_id: str) -> int:
        """The shard has loaded its experts; publish it in the routing table."""
        self.registry.mark_ready(shard_id)
        self.events.append({"t": time.time(), "event": "ready", "shard": shard_id})
        return self.registry.version

    async def table(self, known_version: int = -1) -> dict | None:
        """The routing table, or None when the caller's version is current."""
        self._ensure_health_loop()
        if known_version == self.registry.version:
            return None
        return self.registry.table()

    async def report_failure(self, shard_id: str) -> dict:
        """A gateway saw a call to this shard fail: check it now, drop it if dead; returns the table."""
        info = self.registry.shards.get(shard_id)
        if info is not None and not await self._alive(info.address):
            self._drop(shard_id, "reported dead")
        return self.registry.table()

    async def status(self) -> dict:
        """Placement version, shards with health and held experts, and recent events (for `elasticmoe status`)."""
        shards = []
        for s in sorted(self.registry.shards.values(), key=lambda s: s.position):
            entry = {"id": s.shard_id, "address": s.address, "position": s.position, "ready": s.ready,
                     "healthy": s.healthy, "experts": len(self.registry.assignment(s.position))}
            entry.update(await self._shard_stats(s.address))
            shards.append(entry)
        return {"version": self.registry.version, "complete": self.registry.complete(), "shards": shards,
                "num_shards": self.registry.placement.num_shards, "events": self.events[-20:]}

    async def _shard_stats(self, address: str) -> dict:
        try:
            r = await self._stub(address).GetStats(pb.GetStatsRequest(), timeout=2.0)
        except grpc.RpcError as e:
            return {"stats_error": str(e.code())}
        return {"tokens": sum(t.tokens for t in r.tokens), "calls": r.calls, "weight_bytes": r.weight_bytes,
                "compute_s": r.compute_us / 1e6, "held": len(r.held),
                "expert_tokens": [[t.layer, t.expert, t.tokens] for t in r.tokens]}

    def _drop(self, shard_id: str, why: str) -> None:
        if self.registry.remove(shard_id) is not None:
            log.warning("shard %s removed: %s", shard_id, why)
            self.events.append({"t": time.time(), "event": "removed", "shard": shard_id, "why": why})

    async def _alive(self, address: str, timeout: float = 1.0) -> bool:
        try:
            resp = await self._stub(address).Health(pb.HealthRequest(), timeout=timeout)
            return resp.ok
        except grpc.RpcError:
            return False

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for info in list(self.registry.shards.values()):
                if info.ready and not await self._alive(info.address):
                    self._drop(info.shard_id, "health check failed")
