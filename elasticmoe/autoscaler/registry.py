"""The shard registry: positions in the placement, which replica fills each, and the routing table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from elasticmoe.placement import Placement


@dataclass
class ShardInfo:
    """One registered expert-shard replica."""

    shard_id: str
    address: str
    position: int  # shard index in the placement
    ready: bool = False
    healthy: bool = True
    registered_at: float = field(default_factory=time.monotonic)


class Registry:
    """Maps placement positions (0..N-1) to live shard replicas. Pure bookkeeping: no Ray, no gRPC.

    `moe_layers[i]` is the model layer of placement layer i.
    """

    def __init__(self, placement: Placement, moe_layers: list[int]):
        self.placement = placement
        self.moe_layers = moe_layers
        self.version = 1
        self.shards: dict[str, ShardInfo] = {}

    def register(self, shard_id: str, address: str) -> ShardInfo:
        """Give a new replica a free position (or its old one back)."""
        if shard_id in self.shards:
            info = self.shards[shard_id]
            info.address, info.healthy = address, True
            return info
        taken = {s.position for s in self.shards.values() if s.healthy}
        free = [p for p in range(self.placement.num_shards) if p not in taken]
        position = free[0] if free else self.placement.num_shards  # surplus replica: a spare position
        info = ShardInfo(shard_id, address, position)
        self.shards[shard_id] = info
        return info

    def assignment(self, position: int) -> list[tuple[int, int]]:
        """(model layer, expert) pairs the placement puts at `position`."""
        if position >= self.placement.num_shards:
            return []
        return [(self.moe_layers[l], e) for l, e in self.placement.experts_on(position)]

    def mark_ready(self, shard_id: str) -> None:
        if shard_id in self.shards:
            self.shards[shard_id].ready = True
            self.version += 1

    def remove(self, shard_id: str) -> ShardInfo | None:
        """Forget a dead replica; its position becomes free for the next replica to register."""
        info = self.shards.pop(shard_id, None)
        if info is not None:
            self.version += 1
        return info

    def set_placement(self, placement: Placement) -> None:
        """Publish a new placement (a new version)."""
        self.placement = placement
        self.version += 1

    def retire(self, position: int) -> Placement:
        """Renumber positions so `position` is last; returns the relabelled placement (ready for scale-in)."""
        n = self.placement.num_shards
        order = [p for p in range(n) if p != position] + [position]
        new_pos = {old: i for i, old in enumerate(order)}
        for s in self.shards.values():
            if s.position < n:
                s.position = new_pos[s.position]
        self.placement = self.placement.relabel(order)
        return self.placement

    def by_position(self) -> dict[int, ShardInfo]:
        return {s.position: s for s in self.shards.values() if s.healthy}

    def live(self) -> list[ShardInfo]:
        return [s for s in self.shards.values() if s.ready and s.healthy and s.position < self.placement.num_shards]

    def complete(self) -> bool:
        """Every (layer, expert) has at least one ready copy."""
        ready = {s.position for s in self.live()}
        return all(any(s in ready for s, _ in reps) for row in self.placement.layout for reps in row)

    def table(self) -> dict:
        """The routing table for gateways (see RoutingTable.from_dict); copies on non-ready shards are left out."""
        live = sorted(self.live(), key=lambda s: s.position)
        index = {s.position: i for i, s in enumerate(live)}
        layers = {}
        for l, row in enumerate(self.placement.layout):
            experts = []
            for reps in row:
                kept = [(index[p], share) for p, share in reps if p in index]
                total = sum(sh for _, sh in kept)
                if kept and total <= 0:
                    kept = [(i, 1.0 / len(kept)) for i, _ in kept]
                    total = 1.0
                experts.append([(i, sh / total) for i, sh in kept])
            layers[self.moe_layers[l]] = experts
        return {"version": self.version, "complete": self.complete(),
                "shards": [{"id": s.shard_id, "address": s.address, "position": s.position} for s in live],
                "layers": layers}
