"""The controller's recovery after a restart: its GCS record resumed, then the shards' own holdings reconciled."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from elasticmoe.autoscaler.policy import ScaleDecider
from elasticmoe.autoscaler.record import FORMAT
from elasticmoe.autoscaler.registry import Registry
from elasticmoe.config import AppArgs
from elasticmoe.placement import Placement

log = logging.getLogger("elasticmoe.controller")
# The args that say what the record's placement means: the experts and their weights (model, revision), what the
# shards hold them as (dtype, device), the layout (num_shards, expert_copies, autoscaling.slots_per_shard; whether
# the controller owns the shard count: autoscaling set) and whether the controller can reach the recorded shards at
# all (insecure_internal). Every other arg (autoscaling's cool-down, deadline, interval, bounds and thresholds,
# limits, gateways, metrics, keys) may change across a redeploy: the resumed controller runs with the new value.
PLACEMENT_ARGS = ("model", "revision", "dtype", "device", "num_shards", "expert_copies", "insecure_internal")


def placement_key(args: AppArgs) -> str:
    """A hash of the args that decide whether a recorded placement is still valid (PLACEMENT_ARGS), after
    validation: a default written out hashes as the default left unset."""
    auto = args.autoscaling
    doc = {name: getattr(args, name) for name in PLACEMENT_ARGS}
    doc.update(autoscaling=auto is not None, slots_per_shard=auto.slots_per_shard if auto else None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _recorded_version(rec: dict | None) -> int:
    """The table version a record names, 0 when it has none readable."""
    try:
        return max(0, int(rec["registry"]["version"]))  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return 0


class Recovery:
    """Mixin of the Controller: resumes the placement from the record (`_resume`) and, once running, makes the
    shards' holdings agree with it (`_recover`). Needs the Controller's and Mover's state (`placement_key`, `slots`,
    `num_experts`, `scale`, `layer_index`, `_lock`, `_held`, `_load_many`, `_drop_after_acks`, `_grow`, `_publish`,
    `_spawn`, `_event`)."""

    registry: Registry
    scale: ScaleDecider | None
    desired: int
    recovering: bool
    moe_layers: list[int]
    num_experts: int
    slots: int
    placement_key: str
    layer_index: dict[int, int]
    _lock: asyncio.Lock | None

    def _resume(self, rec: dict | None, n: int, copies: int) -> None:
        """The registry, shard count, operator override and scaling clocks (the last change's cool-down, the
        warm-up) from the record when its placement is still valid (same `placement_key`: other args may differ,
        and the shard count is brought within this app's autoscaling bounds); else `n` shards of an even placement
        (`copies` per expert), numbered above any recorded version. A record of a format this release does not read
        (record.FORMAT: a newer release's, after a rollback), or one that does not restore or does not fit the model
        (its layers and experts), is ignored with a warning (raising would restart this controller into it for good)."""
        fmt = rec.get("format", 1) if rec else FORMAT  # releases before the field wrote format 1
        if fmt != FORMAT:
            log.warning("the controller record is of format %r, which this release does not read (it reads format %d; "
                        "a newer release wrote it): starting over", fmt, FORMAT)
        self.recovering = bool(rec and fmt == FORMAT and rec.get("placement") == self.placement_key)
        if rec and fmt == FORMAT and not self.recovering:
            log.warning("the controller record is of other placement args (%s, slots_per_shard): starting over",
                        ", ".join(PLACEMENT_ARGS))
        if self.recovering:
            try:
                self.registry = Registry.restore(rec["registry"], self.moe_layers)
                self._fits(self.registry.placement)
                desired = int(rec.get("desired", n))
                override = rec.get("override")
                override = None if override is None else int(override)
                if self.scale is not None:  # a restart neither waits a warm-up again nor cuts a cool-down short
                    self.scale.resume(rec.get("scale") or {})
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                log.warning("ignoring a controller record that does not restore (%r): starting over", e)
                self.recovering = False
            else:
                self.desired = desired
                if self.scale is not None:  # bounds the redeploy may have changed
                    self.desired = max(self.scale.min_shards, min(self.scale.max_shards, desired))
                if self.scale is not None and override is not None:
                    self.scale.override = override  # the operator's count outlives a controller restart
                return
        even = Placement.even(len(self.moe_layers), self.num_experts, n, self.slots, copies)
        self.registry = Registry(even, self.moe_layers, version=_recorded_version(rec) + 1)

    def _fits(self, placement: Placement) -> None:
        """ValueError unless a recorded placement is of this model's MoE layers and experts (a checkpoint directory
        replaced in place keeps the placement args: a table of its layers raised, or left layers and experts out)."""
        layout = placement.layout
        if len(layout) != len(self.moe_layers) or len(layout[0]) != self.num_experts:
            raise ValueError(f"registry.placement: {len(layout)} MoE layers of {len(layout[0])} experts; the model "
                             f"has {len(self.moe_layers)} of {self.num_experts}")

    async def _reconcile(self, drops: dict[str, list[tuple[int, int]]]) -> None:
        """(Holding the lock.) Every registered shard at once (one that does not answer costs one timeout, not one
        for each shard after it): reload what its position lost; what it holds beyond that goes to `drops`; one
        that does not answer (or cannot load) is marked unhealthy for the health loop."""
        infos = list(self.registry.shards.values())
        for error in await asyncio.gather(*(self._reconcile_one(i, drops) for i in infos), return_exceptions=True):
            if isinstance(error, BaseException):  # a bug: raised once every shard's reconciling has ended
                raise error

    async def _reconcile_one(self, info, drops: dict[str, list[tuple[int, int]]]) -> None:
        held = await self._held(info.address, info.shard_id)
        if held is None:
            info.healthy = False  # the health loop re-homes it (or a new replica takes its position)
            return
        want = set(self.registry.assignment(info.position)) if info.ready else set()
        try:
            await self._load_many({info.address: sorted(want - held)})
        except Exception:  # noqa: BLE001
            info.healthy = False
            return
        if info.ready and held - want:
            drops[info.shard_id] = [(self.layer_index[l], e) for l, e in sorted(held - want)]

    async def _recover(self) -> None:
        """After a restart: the shards are the truth. Keep what they hold, reload what they lost, lose the dead.
        Copies the record's placement does not name are dropped only once every gateway runs this controller's
        table: a gateway may still route to them (the old controller died before it polled a committed change, or
        published one whose record was not saved)."""
        async with self._lock:
            drops: dict[str, list[tuple[int, int]]] = {}  # shard id -> (placement layer, expert)
            try:
                await self._reconcile(drops)
            except Exception:  # noqa: BLE001 - a bug: recovering for good would hold back re-homing and growth
                self.loop_errors += 1
                self._event("loop_error", loop="_recover")
                log.exception("controller recovery failed; serving on the recorded placement")
            self.recovering = False
            self._event("recovered", shards=len(self.registry.shards))
            self._publish()
            if drops:
                self._spawn(self._drop_after_acks(drops, self.registry.version))
            if self.registry.spares():
                await self._grow()
