"""The shard registry: positions in the placement, which replica fills each, and the routing table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from elasticmoe.autoscaler.clocks import wall_minus_monotonic
from elasticmoe.placement import Placement


@dataclass
class ShardInfo:
    """One registered expert-shard replica."""

    shard_id: str
    address: str
    position: int  # shard index in the placement (>= num_shards: a spare, not yet placed)
    ready: bool = False  # loaded its assignment
    healthy: bool = True  # answered its last health check
    registered_at: float = field(default_factory=time.monotonic)
    seen: int = 0  # bumped when it answers as itself again or moves: a probe's verdict from before is stale
    load_error: str | None = None  # why its plan could not be loaded (Controller.plan_failed), until it gets ready

    def found_good(self) -> None:
        self.seen += 1

    def move(self, address: str) -> bool:
        """Take the shard's address (a heartbeat's, a registration's); whether it changed. A probe of the old address
        says nothing of the new one: a verdict from before the move is stale."""
        if address == self.address:
            return False
        self.address = address
        self.found_good()
        return True


@dataclass(frozen=True)
class Change:
    """A placement change computed but not yet committed: `relabel` maps old positions to new ones."""

    current: Placement  # the current placement, renumbered to the new positions
    new: Placement
    relabel: dict[int, int]
    remove: tuple[str, ...] = ()  # shards that leave the placement on commit
    add: tuple[str, ...] = ()  # spares that join it


class Registry:
    """Maps placement positions (0..N-1) to shard replicas. Pure bookkeeping: no Ray, no gRPC.

    `moe_layers[i]` is the model layer of placement layer i. Changes are computed first (`retire`, `extend`)
    and committed only after the new copies are loaded (`commit`): make-before-break.
    """

    def __init__(self, placement: Placement, moe_layers: list[int], version: int = 1):
        self.placement = placement
        self.moe_layers = moe_layers
        self.version = version
        self.shards: dict[str, ShardInfo] = {}
        self.unstaffed: dict[int, float] = {}  # position without a live shard -> since when (monotonic; `overdue`)

    # ----- membership
    def register(self, shard_id: str, address: str) -> ShardInfo:
        """Give a new replica a free position (or its old one back); a position whose holder is dead is free. A
        published replica found dead stays out of the table: registering is no health check (see mark_ready)."""
        if shard_id in self.shards:
            info = self.shards[shard_id]
            info.move(address)
            if not info.ready:  # in no table yet: it keeps its position
                info.healthy = True
            return info
        holders = {s.position: s for s in self.shards.values()}
        free = [p for p in range(self.placement.num_shards) if p not in holders or not holders[p].healthy]
        if free:
            position = free[0]
            if position in holders:  # take over a dead replica's position (its re-homing never finished)
                del self.shards[holders[position].shard_id]
        else:
            position = max([self.placement.num_shards - 1, *holders]) + 1  # a spare
        info = ShardInfo(shard_id, address, position)
        self.shards[shard_id] = info
        return info

    def assignment(self, position: int) -> list[tuple[int, int]]:
        """(model layer, expert) pairs the placement puts at `position`."""
        if position >= self.placement.num_shards:
            return []
        return [(self.moe_layers[l], e) for l, e in self.placement.experts_on(position)]

    def mark_ready(self, shard_id: str) -> bool:
        """The replica answered as itself holding its assignment: in the table (again, if it was found dead)."""
        if shard_id not in self.shards:
            return False
        self.shards[shard_id].ready = self.shards[shard_id].healthy = True
        self.shards[shard_id].load_error = None
        self.shards[shard_id].found_good()
        return True

    def forget(self, shard_id: str) -> ShardInfo | None:
        """Drop a replica that holds no position of the placement (a spare, or one never ready)."""
        return self.shards.pop(shard_id, None)

    def by_position(self) -> dict[int, ShardInfo]:
        return {s.position: s for s in self.shards.values()}

    def live(self) -> list[ShardInfo]:
        return [s for s in self.shards.values() if s.ready and s.healthy and s.position < self.placement.num_shards]

    def spares(self) -> list[ShardInfo]:
        return sorted((s for s in self.shards.values() if s.ready and s.healthy
                       and s.position >= self.placement.num_shards), key=lambda s: s.position)

    def overdue(self, now: float, deadline_s: float) -> list[int]:
        """Positions of the placement without a live shard for `deadline_s` by `now` (monotonic): none registered,
        or it never got ready (or failed). A position's clock starts at the first call that finds it so, stops when
        it is live, and follows it through commits' renumbering (a replacement replica does not restart it)."""
        live = {s.position for s in self.live()}
        self.unstaffed = {p: self.unstaffed.get(p, now) for p in range(self.placement.num_shards) if p not in live}
        return sorted(p for p, since in self.unstaffed.items() if now - since >= deadline_s)

    # ----- changes (make-before-break)
    def retire(self, positions: list[int]) -> tuple[Placement, dict[int, int]]:
        """(current placement renumbered so `positions` come last, old -> new positions). No mutation."""
        order = [p for p in range(self.placement.num_shards) if p not in positions] + positions
        return self.placement.relabel(order), {old: i for i, old in enumerate(order)}

    def vacant(self) -> list[int]:
        """Positions of the placement where no copy can be loaded: held by no shard, or by a ready one that failed."""
        holders = self.by_position()
        return [p for p in range(self.placement.num_shards)
                if p not in holders or (holders[p].ready and not holders[p].healthy)]

    def commit(self, change: Change) -> None:
        """Publish `change.new`: renumber shards, drop the leaving ones, place the joining spares and renumber the
        other spares after them, in their order (a new version)."""
        for sid in change.remove:
            self.shards.pop(sid, None)
        spares = sorted((s for s in self.shards.values() if s.position not in change.relabel
                         and s.shard_id not in change.add), key=lambda s: s.position)
        for s in self.shards.values():
            if s.position in change.relabel and s.shard_id not in change.add:
                s.position = change.relabel[s.position]
        for i, sid in enumerate(change.add):
            if sid in self.shards:
                self.shards[sid].position = change.current.num_shards + i
        for i, s in enumerate(spares):  # a spare still starting may sit on a position the placement now uses
            s.position = change.new.num_shards + i
        self.unstaffed = {change.relabel[p]: t for p, t in self.unstaffed.items()
                          if change.relabel.get(p, change.new.num_shards) < change.new.num_shards}
        self.placement = change.new
        self.version += 1

    def set_placement(self, placement: Placement) -> None:
        """Publish a new placement over the same positions (a new version)."""
        self.placement = placement
        self.version += 1

    def bump(self) -> int:
        """A new version of the table (membership or health changed)."""
        self.version += 1
        return self.version

    # ----- the published view
    def complete(self) -> bool:
        """Every (layer, expert) has at least one ready copy."""
        ready = {s.position for s in self.live()}
        return all(any(s in ready for s, _ in reps) for row in self.placement.layout for reps in row)

    def staffed(self) -> bool:
        """Every position of the placement is held by a live shard (so copies can be loaded at any of them)."""
        return {s.position for s in self.live()} == set(range(self.placement.num_shards))

    def live_copies(self) -> np.ndarray:
        """[L, E] copies of every expert on live shards (the copies the table routes to)."""
        live = sorted({s.position for s in self.live()})
        return self.placement.holds()[:, :, live].sum(2)

    def table(self) -> dict:
        """The routing table for gateways (see RoutingTable.from_dict); copies on non-live shards are left out."""
        live = sorted(self.live(), key=lambda s: s.position)
        index = {s.position: i for i, s in enumerate(live)}
        layers = {}
        for l, row in enumerate(self.placement.layout):
            layers[self.moe_layers[l]] = [[(index[p], share) for p, share in reps if p in index] for reps in row]
        return {"version": self.version, "complete": self.complete(),
                "shards": [{"id": s.shard_id, "address": s.address, "position": s.position} for s in live],
                "layers": layers}

    # ----- persistence (the controller's record in Ray's GCS)
    def record(self) -> dict:
        """What `restore` needs; the start clocks as wall-clock times (a restarted controller's monotonic clock is
        another's)."""
        wall = wall_minus_monotonic(time)
        return {"version": self.version, "placement": self.placement.to_dict(),
                "shards": [{"id": s.shard_id, "address": s.address, "position": s.position, "ready": s.ready,
                            "healthy": s.healthy} for s in self.shards.values()],
                "unstaffed": {str(p): since + wall for p, since in self.unstaffed.items()}}

    @classmethod
    def restore(cls, record: dict, moe_layers: list[int]) -> "Registry":
        """A registry from `record()`: same placement and shards, a version above the recorded one. A shard found
        dead stays out of the table (a record without health: all healthy) until a probe finds it answering."""
        reg = cls(Placement.from_dict(record["placement"]), moe_layers, int(record["version"]) + 1)
        if not isinstance(record["shards"], list):
            raise ValueError(f"registry.shards: {type(record['shards']).__name__}, want a list")
        held: dict[int, str] = {}
        for i, s in enumerate(record["shards"]):
            sid, address, position = s["id"], s["address"], s["position"]
            if not (isinstance(sid, str) and isinstance(address, str) and type(position) is int and position >= 0):
                raise ValueError(f"registry.shards[{i}]: id {sid!r}, address {address!r}, position {position!r}; "
                                 f"want two strings and an int >= 0")
            if sid in reg.shards or position in held:
                raise ValueError(f"registry.shards[{i}]: shard {sid!r} at position {position}: that shard or "
                                 f"position is listed twice")
            held[position] = sid
            reg.shards[sid] = ShardInfo(sid, address, position, bool(s["ready"]), bool(s.get("healthy", True)))
        mono = -wall_minus_monotonic(time)
        reg.unstaffed = {int(p): float(since) + mono for p, since in record.get("unstaffed", {}).items()}
        return reg

