"""The controller deployment: shard registry, placement versions, live re-placement, failover and scaling."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time

from ray import serve

from elasticmoe.autoscaler.backoff import Backoffs
from elasticmoe.autoscaler.health import HealthKeeper
from elasticmoe.autoscaler.moves import EVENT_ERROR_CHARS, LoadFailed, Mover
from elasticmoe.autoscaler.policy import LoadTracker, ScaleDecider
from elasticmoe.autoscaler.record import FORMAT, GcsRecord
from elasticmoe.autoscaler.recovery import Recovery, placement_key
from elasticmoe.autoscaler.replace import Replacer
from elasticmoe.autoscaler.registry import Change, Registry, ShardInfo
from elasticmoe.autoscaler.stats import StatsKeeper
from elasticmoe.config import AppArgs, ScaleConfig, check_slots, weights_id
from elasticmoe.placement import Placement, plan

log = logging.getLogger("elasticmoe.controller")
TABLE_WAIT_MAX_S = 5.0  # the longest a table() long poll is held
TABLE_CHECK_S = 0.02  # how often a held table() call looks for a new version
RESHARE_GAIN = 0.02  # a rebalance publishes new shares without moves when they lift a layer's balancedness this much
STATS_INTERVAL_S = 1.0  # how often the stats loop reads every live shard's counters


def default_slots(num_experts: int, num_shards: int, copies: int = 1) -> int:
    """Expert slots per (shard, layer): an even split plus 25% headroom for hot-expert copies."""
    even = -(-num_experts * copies // num_shards)
    return min(num_experts, even + max(1, even // 4))


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside Serve (tests of the controller's logic)
        return "default"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class Controller(Mover, StatsKeeper, Recovery, Replacer, HealthKeeper):
    """Owns the placement. Gateways poll `table()`; shards `register()` and `heartbeat()`; loops track load
    (StatsKeeper) and health (HealthKeeper). A restarted controller resumes from its GCS record and the shards' own
    holdings (Recovery)."""

    def __init__(self, args: dict):
        from elasticmoe.model.layout import moe_layout

        self.args = AppArgs.model_validate(args)
        self.epoch = secrets.token_hex(8)  # this instance: its table versions say nothing about another's
        self.weights = weights_id(self.args)  # in its tables and plans: no gateway or shard of other weights follows
        # (the gateway checks the whole checkpoint, the shards their experts): no torch where a spec was derived before
        layout = moe_layout(self.args.model)
        self.moe_layers = list(layout.moe_layers)
        self.layer_index = {l: i for i, l in enumerate(self.moe_layers)}
        self.num_experts = layout.num_experts
        check_slots(self.args, self.num_experts)  # as the app build does (a tiny:<family> model is known only now)
        auto = self.args.autoscaling
        n, copies = self.args.num_shards, self.args.expert_copies
        self.slots = (auto.slots_per_shard if auto else None) or default_slots(self.num_experts, n, copies)
        self.max_moves = auto.max_moves if auto else 8
        self.load = LoadTracker(len(self.moe_layers), self.num_experts)
        self.scale = ScaleDecider(auto.min_shards, auto.max_shards, auto.target_utilization,
                                  auto.scale_cooldown_s) if auto else None
        self.desired = n
        self.backoffs = Backoffs()  # failing re-homes, scale outs and revivals (Replacer), their retries' waits
        self.record = GcsRecord(_app_name())
        self.placement_key = placement_key(self.args)  # a record of other timing or policy args still resumes
        rec = self.record.load()
        self._resume(rec, n, copies)
        self._fresh = not self.recovering  # no record resumed and no call yet: user_config's start_shards applies
        Mover.__init__(self, insecure=self.args.insecure_internal, successor=rec is not None)
        from elasticmoe.metrics import GatewayMetrics

        self.metrics = GatewayMetrics(self.args.expert_metrics, layout.num_layers, self.num_experts, self.moe_layers)
        self._verdicts, self._wake = {}, asyncio.Event()  # the health rounds' (HealthKeeper)
        self._save()

    # ----- plumbing
    async def reconfigure(self, config: dict) -> None:
        """Serve's user_config (config.ScaleConfig), right after __init__ and again on each change of it, in place (no
        replica restarted): the shard bounds, the count brought within them; and for a controller that resumed no
        record and has had no call yet, start_shards: its first placement spread over that many shards, and the
        count it asks for. A bad config raises ValueError naming the field and changes nothing."""
        cfg = ScaleConfig.model_validate(config).within(self.args)
        first = None
        if cfg.start_shards is not None and self._fresh and not self.registry.shards:
            try:
                first = Placement.even(len(self.moe_layers), self.num_experts, cfg.start_shards, self.slots,
                                       self.args.expert_copies)
            except ValueError as e:
                raise ValueError(f"user_config.start_shards ({cfg.start_shards}): {e}") from None
        self._fresh = False
        self.scale.min_shards, self.scale.max_shards = cfg.min_shards, cfg.max_shards
        if first is not None:
            self.registry = Registry(first, self.moe_layers, version=self.registry.version)
            self.desired = cfg.start_shards
        self.desired = self.scale.desired(self.desired, [])
        self._save()

    def _start(self) -> asyncio.Lock:
        if self._lock is None:
            self._fresh = False
            self._lock = asyncio.Lock()
            loops = [self._probe_once, self._stats_once]
            if self.args.autoscaling:
                loops.append(self._rebalance_once)
            for f in loops:
                self._spawn(self._forever(f))
            self._spawn(self._forever(self._settle_once, wake=self._wake))  # after each probe round
            if self.recovering:
                self._spawn(self._recover())
        return self._lock

    async def _forever(self, once, wake: asyncio.Event | None = None) -> None:
        """Run a loop body forever, each `wake` (else each interval): an exception is logged and counted, never the
        end of the loop."""
        interval = self.args.autoscaling.rebalance_interval_s if once == self._rebalance_once else STATS_INTERVAL_S
        while True:
            if wake is None:
                await asyncio.sleep(interval)
            else:
                await wake.wait()
                wake.clear()
            try:
                await once()
            except Exception:  # noqa: BLE001 - keep the controller alive; the metric shows it
                self.loop_errors += 1
                self._event("loop_error", loop=once.__name__)
                log.exception("controller loop %s failed", once.__name__)

    def _save(self) -> None:
        try:
            override = self.scale.override if self.scale is not None else None
            scale = self.scale.state() if self.scale is not None else None
            self.record.save({"format": FORMAT, "placement": self.placement_key, "desired": self.desired,
                              "override": override, "scale": scale, "registry": self.registry.record()})
        except Exception as e:  # noqa: BLE001 - serving goes on; the next change writes it again
            log.warning("saving the controller record failed: %s", e)

    def _publish(self) -> None:
        """A new table version (membership, health or placement changed) and its durable record."""
        self.registry.bump()
        self._save()

    # ----- shard lifecycle
    async def register(self, shard_id: str, address: str) -> dict:
        """A shard replica announces itself; returns its position, the experts it must load, the desired shard count
        (the replica reports it to Serve's autoscaler), whether it is already `published` (a retry after its ready
        answer was lost: gateways may route to copies it holds beyond the assignment, which the drops after the acks
        remove) and the `weights` (config.weights_id) placed: a shard of others loads nothing. Waits for a change in
        progress: a re-home retires the failed shard's position, which a replacement would otherwise take over."""
        async with self._start():
            info = self.registry.register(shard_id, address)
            self._save()
            return {"position": info.position, "experts": self.registry.assignment(info.position),
                    "version": self.registry.version, "published": info.ready, "desired": self.desired,
                    "weights": self.weights}

    async def ready(self, shard_id: str) -> dict:
        """The shard loaded its experts: publish it; a spare replica grows the placement onto itself, once a
        recovery that this first call may have started (`_start`; it waits for the lock) has checked the shards.
        Returns {"version"} once published; {"load_error"} when the experts assigned to it since its plan cannot be
        read from the checkpoint (FAILED_PRECONDITION: a file damaged or gone), as `plan_failed` records it: the
        shard tries again with its plan's backoff (experts.deployment)."""
        lock = self._start()
        async with lock:
            info = self.registry.shards.get(shard_id)
            if info is None:
                raise KeyError(f"shard {shard_id} is not registered")
            try:
                await self._hold_assignment(info)
            except LoadFailed as e:
                if not e.unreadable:
                    raise  # out of memory, busy, gone: its registration's quick retry
                error = f"the experts assigned to it since its plan: {e}"
                self._load_error(info, error)
                return {"load_error": error}
            self.registry.mark_ready(shard_id)
            self._event("ready", shard=shard_id)
            self._publish()
            if self.registry.spares() and not self.recovering:  # else the recovery's end grows onto it
                await self._grow()
        return {"version": self.registry.version}

    async def plan_failed(self, shard_id: str, error: str) -> None:
        """A registered shard could not load its plan: the checkpoint cannot give some of its experts (the error names
        the file and the tensor), or they do not fit in its memory (the error names their bytes and what memory
        refused). It tries again with a backoff; its status shows the error until it gets ready."""
        self._start()
        info = self.registry.shards.get(shard_id)
        if info is not None:
            self._load_error(info, error)

    def _load_error(self, info: ShardInfo, error: str) -> None:
        """Why a shard cannot load its experts, in its status until it gets ready; the events and the log record it
        once per message, not once per try."""
        if info.load_error == error:
            return
        info.load_error = error
        self._event("plan_failed", shard=info.shard_id, error=error[:EVENT_ERROR_CHARS])
        log.error("shard %s cannot load its experts (it tries again with a backoff): %s", info.shard_id, error)

    async def _hold_assignment(self, info: ShardInfo) -> None:
        """Make a shard about to be published hold exactly its position's assignment. The plan it loaded may be
        stale: a change committed meanwhile loaded copies onto it (which dropping what that plan does not name
        undid) or dropped some (which loading the plan brought back). In no table yet, it can drop at once; one
        already published (its ready answer was lost) keeps its extras for the drops after the acks."""
        held = await self._held(info.address, info.shard_id)
        if held is None:
            raise RuntimeError(f"shard {info.shard_id} does not answer at {info.address}")
        want = set(self.registry.assignment(info.position))
        await self._load_many({info.address: sorted(want - held)})
        if not info.ready:
            await self._drop_now({info.address: sorted(held - want)})

    async def heartbeat(self, shard_id: str, address: str) -> dict:
        """A shard's periodic check-in: `known` False means it was dropped and must be replaced (no zombies)."""
        self._start()
        info = self.registry.shards.get(shard_id)
        if info is not None and info.move(address):
            self._publish()
        return {"known": info is not None, "desired": self.desired, "version": self.registry.version}

    async def drain(self, shard_id: str) -> dict:
        """Scale-in: load this shard's experts elsewhere (failed loads tried again: Replacer._drain), publish without
        it, wait for the gateways, let it go, all within the stopping replica's graceful shutdown. Returns the table
        and `drained`: whether every expert it held has a live copy elsewhere (False: it is still in the table with
        some, the time ran out or the loads failed; once it stops the health round re-homes them)."""
        drained = await self._drain(shard_id)  # within replace.DRAIN_S, the wait for a change in progress included
        return {**self._table(), "drained": drained}

    # ----- gateway and operator API
    async def table(self, known_version: int = -1, gateway_id: str | None = None, wait_s: float = 0.0,
                    known_epoch: str | None = None) -> dict | None:
        """The routing table, or None when the caller's version is still current after `wait_s` seconds (a long
        poll, at most TABLE_WAIT_MAX_S: a new version is answered within TABLE_CHECK_S). `gateway_id` acknowledges
        the caller's version. A version of another controller instance (`known_epoch`) is not this one's: a restart
        without the record starts over, one whose last save failed repeats a number with another table."""
        self._start()
        if known_epoch is not None and known_epoch != self.epoch:
            known_version = -1
        if gateway_id is not None:
            self._ack(gateway_id, known_version)
        deadline = time.monotonic() + min(max(0.0, wait_s), TABLE_WAIT_MAX_S)
        while known_version == self.registry.version and time.monotonic() < deadline:
            await asyncio.sleep(TABLE_CHECK_S)
        if known_version == self.registry.version:
            return None
        return self._table()

    def _table(self) -> dict:
        return {**self.registry.table(), "epoch": self.epoch, "weights": self.weights}

    async def info(self) -> dict:
        """This replica's pid and state (for failure tests and `elasticmoe status`)."""
        import os

        return {"pid": os.getpid(), "version": self.registry.version, "recovering": self.recovering}

    async def desired_shards(self) -> int:
        return self.desired

    async def set_target_shards(self, n: int | None) -> int:
        """Operator override of the shard count (None: back to utilization-based autoscaling); a count outside
        autoscaling's min_shards..max_shards is refused (ValueError), not clamped."""
        if self.scale is None:
            raise ValueError("autoscaling is not configured for this app (args.autoscaling)")
        lo, hi = self.scale.min_shards, self.scale.max_shards
        if n is not None and (type(n) is not int or not lo <= n <= hi):
            raise ValueError(f"shards {n!r} is outside autoscaling's min_shards..max_shards ({lo}..{hi})")
        self.scale.override = n
        self.desired = self.scale.desired(self.desired, [])
        self._save()
        return self.desired

    async def rebalance(self) -> dict:
        """Re-plan now from the measured load (bounded moves) once every position has a live shard; returns the
        event. Slots as a scale out plans them: the configured ones, or the fewest that fit every expert (a re-home
        onto few live shards widened them; a rebalance after shards came back drops the extra copies)."""
        async with self._start():
            if self.registry.staffed() and not self.recovering:
                cur, load = self.registry.placement, self.load.planning_load()
                slots = max(self.slots, math.ceil(self.num_experts / cur.num_shards))
                new = plan(load, cur.num_shards, slots, current=cur, max_moves=self.max_moves,
                           min_copies=self.args.expert_copies)
                # new shares alone (no weight moved) are published too when they lift a layer's balancedness
                if any(cur.diff(new)) or (new.balancedness(load) - cur.balancedness(load)).max() >= RESHARE_GAIN:
                    await self._apply(Change(cur, new, {p: p for p in range(cur.num_shards)}), "rebalance")
        return self.events[-1] if self.events else {}

    # ----- loops
    async def _rebalance_once(self) -> None:
        await self.rebalance()
