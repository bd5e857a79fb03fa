"""Re-placement on membership changes (make-before-break): lose a failed or drained shard, revive a paused one, grow
onto ready spares; a mixin of the Controller, run under its lock."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import numpy as np

from elasticmoe.autoscaler.backoff import Backoffs
from elasticmoe.autoscaler.moves import ACK_TIMEOUT_S, EVENT_ERROR_CHARS, LoadFailed
from elasticmoe.autoscaler.registry import Change, ShardInfo
from elasticmoe.placement import Placement, plan
from elasticmoe.placement.fit import top_up

log = logging.getLogger("elasticmoe.controller")
GROW_BACKOFF_MAX_S = 60.0  # the longest a failed scale out waits for the health round's next try
REHOME_BACKOFF_MAX_S = 30.0  # the longest a failed re-home (experts without a live copy) waits for its next try
DRAIN_ATTEMPTS = 3  # re-home tries of a drain whose loads fail
# A drain's re-home ends this long after the drain call: its wait for a change in progress (the controller's lock)
# and its tries, none starting later, each load's gRPC deadline cut to it (a roll back's drops get
# moves.ROLLBACK_DROP_S more, its stats call 2 s); then the gateways' acks, the whole drain within DRAIN_S. With the
# replica's probe of the controller (5 s) and its server's stop (<= 8 s) it fits the stopping replica's graceful
# shutdown (config.SHARD_SHUTDOWN_S, 60 s), after which Serve kills it: tests/test_controller_drain.py
DRAIN_REHOME_S = 15.0
DRAIN_S = 45.0


def _then_kept(new: Placement, current: Placement, count: int, load: np.ndarray | None = None, copies: int = 1,
               fill: tuple[int, ...] = ()) -> Placement:
    """`new` followed by the `count` positions of `current` after its own, unchanged (shards still loading, or whose
    loads failed) but for those of `fill` (indices among them: shards still loading), which also take copies of the
    experts short of `copies` where their slots allow: `new`'s shards may be too few to hold them (one live shard
    holds one copy of each). A loading shard loads them before it is published (Controller.ready). Shares are
    rescaled with the new ones (a new copy's first at 1 / its copies): gateways split an expert's tokens among its
    live copies by them. load: [L, E]."""
    if not count:
        return new
    n = new.num_shards
    holds = np.concatenate([new.holds(), current.holds()[:, :, n:n + count]], axis=2)  # [L, E, N]
    shares = np.concatenate([new.shares(), current.shares()[:, :, n:n + count]], axis=2)
    slots = max(new.slots_per_shard, int(holds.sum(1).max()))
    targets = np.isin(np.arange(n + count), [n + i for i in fill])  # [N]
    for l in range(holds.shape[0]) if targets.any() else ():
        before = holds[l].copy()
        top_up(load[l], holds[l], targets, min(copies, n + count), slots)
        shares[l] = np.where(holds[l] & ~before, 1.0 / holds[l].sum(1, keepdims=True), shares[l] * holds[l])
    return Placement.from_arrays(shares / shares.sum(2, keepdims=True), holds, slots, new.version)


def _keeps_copies(p: Placement, copies: int) -> bool:
    """Every expert has min(copies, shards) copies in `p`, where its slots allow that many."""
    k = min(copies, p.num_shards)
    return p.num_shards * p.slots_per_shard < k * p.num_experts or bool((p.num_copies() >= k).all())


class Replacer:
    """Needs the Controller's registry, load, args, slots, num_experts, max_moves, backoffs, _start, _apply, _acked,
    _held, _load_many, _event and _publish."""

    backoffs: Backoffs  # failed re-homes, scale outs and revivals: the retries wait (status: `retrying`)

    async def _drain(self, shard_id: str) -> bool:
        """Scale-in of a shard about to stop, within DRAIN_S: its experts get live copies elsewhere first
        (`_drain_tries`, by DRAIN_REHOME_S, the wait for the controller's lock included), then the gateways' acks.
        Returns whether every expert it held while live now has a live copy elsewhere; when not, it is logged and
        counted (`drain_incomplete`) and the shard stays in the table: once it stops, the health round re-homes
        them."""
        began, lock = time.monotonic(), self._start()
        deadline = began + DRAIN_REHOME_S
        if shard_id not in self.registry.shards:
            return True
        try:
            await asyncio.wait_for(lock.acquire(), max(0.05, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # a change in progress held the controller too long
            gone = shard_id not in self.registry.shards  # that change re-homed it
            return gone or self._incomplete(shard_id, 0, "a change in progress held the controller")
        try:
            version, drained = await self._drain_tries(shard_id, deadline)
        finally:
            lock.release()
        if version is not None:
            await self._acked(version, max(0.0, min(ACK_TIMEOUT_S, began + DRAIN_S - time.monotonic())))
        return drained

    async def _drain_tries(self, shard_id: str, deadline: float) -> tuple[int | None, bool]:
        """(Under the lock.) The drain's re-home (`_lose`): a try whose loads fail (or pass `deadline`, monotonic,
        their gRPC deadline) is rolled back and tried again, DRAIN_ATTEMPTS in all, none starting after `deadline`,
        each with the shards whose loads failed kept out of the targets while others are left. Returns (the
        committed version, whether drained: see `_drain`)."""
        info = self.registry.shards.get(shard_id)
        if info is None:
            return None, True
        mine = self.registry.assignment(info.position) if info in self.registry.live() else []
        avoid, version = set(), None
        for attempt in range(1, DRAIN_ATTEMPTS + 1):
            try:
                version = await self._lose(shard_id, "drained", alive=True, kind="scale_in", avoid=avoid, strict=True,
                                           deadline=deadline)
                break
            except LoadFailed as e:
                avoid |= {s.shard_id for s in self.registry.shards.values() if s.address in e.addresses}
                if time.monotonic() >= deadline:
                    break
        live = self.registry.live_copies()  # [L, E]
        drained = shard_id not in self.registry.shards and all(live[self.layer_index[l], e] for l, e in mine)
        return version, drained or self._incomplete(shard_id, attempt, "loads failed or ran out of time")

    def _incomplete(self, shard_id: str, attempts: int, why: str) -> bool:
        """A drain that leaves experts with no live copy elsewhere: counted and logged; False."""
        self._event("drain_incomplete", shard=shard_id, attempts=attempts, why=why)
        log.warning("drain of %s: its experts have no live copy elsewhere after %d tries (%s); the health round "
                    "re-homes them once it is gone", shard_id, attempts, why)
        return False

    async def _lose(self, shard_id: str, why: str, alive: bool = False, kind: str = "rehome",
                    avoid: set[str] = frozenset(), strict: bool = False, deadline: float | None = None) -> int | None:
        """Take a shard out, with any other failed or empty position (a copy cannot be loaded there): their experts
        get live copies elsewhere first; returns the committed version. kind: the metrics' reason (scale_in for a
        drain); avoid, strict, deadline: see `_rehome`."""
        info = self.registry.shards.get(shard_id)
        if info is None:
            return None
        if not alive:
            self._mark_failed([info], why)
        n = self.registry.placement.num_shards
        # a spare holds nothing placed; a shard lost while loading leaves its position's experts without a copy: they
        # are re-homed like a failed shard's, unless no shard is live (then a new replica takes the position over)
        if info.position >= n or (not info.ready and not self.registry.live()):
            self.registry.forget(shard_id)
            self._event("removed", shard=shard_id, why=why)
            self._publish()
            return self.registry.version
        gone = [info.position] + [p for p in self.registry.vacant() if p != info.position]  # other dead ones too
        return await self._rehome(gone, why, kind, shard_id, avoid, strict, deadline)

    async def _give_up(self, positions: list[int]) -> int | None:
        """Take positions that never came up (autoscaling's start_deadline_s: none registered, or it never got ready)
        out of the placement with the failed ones: their experts get copies on the live shards; a replica still
        starting at one is forgotten (should it get ready, its registration retry makes it a spare)."""
        holders = self.registry.by_position()
        starting = [holders[p].shard_id for p in positions if p in holders]
        version = await self._rehome(positions + [p for p in self.registry.vacant() if p not in positions],
                                     "start deadline", "rehome")
        if version is not None:
            self._event("given_up", positions=positions, shards=starting)
        return version

    async def _rehome(self, gone: list[int], why: str, kind: str, shard_id: str | None = None,
                      avoid: set[str] = frozenset(), strict: bool = False, deadline: float | None = None) -> int | None:
        """Re-plan the placement without the positions `gone` (their shards leave it); returns the committed
        version, None when nothing could be re-homed (rolled back, or no shard to re-home onto). The shards in
        `avoid` (ids) get no new copy where the others can take them all, keeping expert_copies; `strict`: a failed
        load raises LoadFailed (after rolling back) instead of returning None; `deadline` (monotonic): the loads'
        (Mover._load_many). One that is not `strict` (the health round's, not a drain's) after a failure waits for its
        back-off (REHOME_BACKOFF_MAX_S at most): a checkpoint that cannot give an expert fails each try alike until the
        file is repaired. The back-off is this set of shards' (`_rehome_name`): a shard that dies meanwhile makes a new
        decision, tried at once, not one waiting out the other's back-off."""
        name = self._rehome_name(gone)
        if not strict and not self.backoffs.due(name):
            return None
        if len(gone) == self.registry.placement.num_shards:  # nothing to re-home onto but ready spares: they join
            if not self.registry.spares() or not await self._widen(why, kind):  # (empty) first
                return None  # a new replica takes this position over
        loading = self._loading(gone)
        avoided = sorted(loading + [s.position for s in self.registry.live() if s.shard_id in avoid and
                                    s.position not in gone])
        others = len(gone) + len(avoided) < self.registry.placement.num_shards  # a shard left to load onto
        tries = [avoided] if avoided != loading and others else []
        for kept in tries + [loading]:  # the avoided shards are targets again where the others cannot keep copies
            current, relabel, new = self._replan(gone, kept)
            if kept == loading or _keeps_copies(new, self.args.expert_copies):
                break
        remove = tuple(s.shard_id for s in self.registry.shards.values() if s.position in gone)
        try:
            await self._apply(Change(current, new, relabel, remove=remove), f"re-home after {why}", kind, deadline)
        except Exception as e:  # noqa: BLE001 - rolled back; the health loop (a drain: `_drain`) tries again
            if strict:
                self._event("rehome_failed", shard=shard_id, why=why, error=str(e)[:EVENT_ERROR_CHARS])
                if isinstance(e, LoadFailed):
                    raise
                return None
            self._forget_rehomes(but=name)  # superseded: this one re-homes theirs too
            failing, new = self.backoffs.failed(name, str(e)[:1000], REHOME_BACKOFF_MAX_S)
            self._event("rehome_failed", shard=shard_id, why=why, error=failing.error[:EVENT_ERROR_CHARS],
                        retry_in_s=failing.wait_s)
            if new:
                log.error("re-home after %s failed (tried again with a backoff): %s", why, failing.error)
            return None
        self._forget_rehomes()
        for sid in remove:
            self._event("removed", shard=sid, why=why if sid == shard_id or shard_id is None else "failed with it")
        return self.registry.version

    def _rehome_name(self, gone: list[int]) -> str:
        """The back-off's name of re-homing the shards at positions `gone`: "re-home <their ids>"."""
        ids = sorted(s.shard_id for s in self.registry.shards.values() if s.position in gone)
        return "re-home " + " ".join(ids or map(str, sorted(gone)))

    def _forget_rehomes(self, but: str | None = None) -> None:
        for name in [n for n in self.backoffs.failing if n.startswith("re-home ") and n != but]:
            self.backoffs.succeeded(name)

    def _loading(self, gone: list[int]) -> list[int]:
        """Positions (besides `gone`) of shards still loading: they serve nothing yet, so every expert gets a copy
        on the live shards, and they keep their assignments (their loads stay valid); with no live shard the copies
        can only wait for them (none kept)."""
        n = self.registry.placement.num_shards
        loading = sorted(s.position for s in self.registry.shards.values()
                         if not s.ready and s.position < n and s.position not in gone)
        return loading if len(gone) + len(loading) < n else []

    def _replan(self, gone: list[int], kept: list[int]) -> tuple[Placement, dict[int, int], Placement]:
        """(current renumbered, old -> new positions, the plan) without `gone`, `kept` keeping their copies and
        getting no new one (the others, at least one, take every expert) but for the shards still loading among
        them, which take the copies the others cannot (expert_copies; see _then_kept)."""
        current, relabel = self.registry.retire(kept + gone)
        live = self.registry.placement.num_shards - len(gone) - len(kept)
        slots = max(self.slots, math.ceil(self.num_experts / live))
        load = self.load.planning_load()
        new = plan(load, live, slots, current=current, max_moves=self.max_moves, min_copies=self.args.expert_copies)
        starting = {s.position for s in self.registry.shards.values() if not s.ready}
        fill = tuple(i for i, p in enumerate(kept) if p in starting)
        return current, relabel, _then_kept(new, current, len(kept), load, self.args.expert_copies, fill)

    async def _widen(self, why: str, kind: str) -> bool:
        """Place the ready spares as empty positions (no copy loaded, the routing unchanged)."""
        cur, spares = self.registry.placement, self.registry.spares()
        pad = ((0, 0), (0, 0), (0, len(spares)))
        wide = Placement.from_arrays(np.pad(cur.shares(), pad), np.pad(cur.holds(), pad), cur.slots_per_shard,
                                     cur.version + 1)
        change = Change(cur, wide, {p: p for p in range(cur.num_shards)}, add=tuple(s.shard_id for s in spares))
        try:
            await self._apply(change, f"spares join to re-home after {why}", kind)
        except Exception as e:  # noqa: BLE001 - nothing loaded; the health loop tries again
            self._event("rehome_failed", why=why, error=str(e)[:EVENT_ERROR_CHARS])
            return False
        return True

    def _mark_failed(self, infos: list[ShardInfo], why: str) -> None:
        """Their copies are gone now: the table must not route to them (one new version for all). Needs no lock: it
        changes no position nor the placement, so a change in progress still commits what it planned (a copy it
        loaded onto a failed shard is out of the table like the others there; the re-home after it moves them)."""
        failed = [info for info in infos if info.healthy]
        for info in failed:
            info.healthy = False
            self._event("unhealthy", shard=info.shard_id, why=why)
        if failed:
            self._publish()

    async def _revive(self, info) -> None:
        """A shard marked unhealthy answers again (it was paused, or its reload in recovery failed) and still holds
        its position: what it lacks of its assignment is loaded, then it is back in the table. One that cannot load
        it is lost (its experts re-homed onto the others), not left out with the only copies for good; while that
        re-home fails too (the checkpoint cannot give them), its reload is tried again with a back-off."""
        name = f"revive {info.shard_id}"
        if not self.backoffs.due(name):
            return
        held = await self._held(info.address, info.shard_id)
        if held is None:
            return
        try:
            await self._load_many({info.address: sorted(set(self.registry.assignment(info.position)) - held)})
        except LoadFailed as e:
            self.backoffs.failed(name, str(e)[:1000], REHOME_BACKOFF_MAX_S)
            await self._lose(info.shard_id, "reload failed", alive=True)
            return
        self.backoffs.succeeded(name)
        info.healthy = True
        info.found_good()
        self._event("revived", shard=info.shard_id)
        self._publish()

    def _forget_settled(self) -> None:
        """End the back-offs of decisions no longer called for: a re-home once every position has a live shard (a
        shard revived, a new replica in its place), a revival once its shard is back or gone, a scale out once no
        spare waits. A later failure starts its back-off over."""
        if self.registry.staffed():
            self._forget_rehomes()
        if not self.registry.spares():
            self.backoffs.succeeded("scale out")
        for name in [n for n in self.backoffs.failing if n.startswith("revive ")]:
            info = self.registry.shards.get(name.removeprefix("revive "))
            if info is None or info.healthy:
                self.backoffs.succeeded(name)

    async def _grow(self, retry: bool = False) -> None:
        """Place every ready spare replica (scale out): copies load onto them first, then the table switches. Not
        while a position of the placement has no live shard (one found dead, not re-homed yet; one still loading):
        copies planned there cannot be loaded. The health round (or that shard's ready()) grows it afterwards. A
        `retry` (the health round's) after failed ones waits 2 s, 4 s, ... GROW_BACKOFF_MAX_S after the last."""
        if not self.registry.staffed() or (retry and not self.backoffs.due("scale out")):
            return
        spares = self.registry.spares()
        cur = self.registry.placement
        n = cur.num_shards + len(spares)
        slots = max(self.slots, math.ceil(self.num_experts / n))  # as in _lose: every expert must fit
        new = plan(self.load.planning_load(), n, slots, current=cur, max_moves=max(self.max_moves, slots * len(spares)),
                   min_copies=self.args.expert_copies)
        change = Change(cur, new, {p: p for p in range(cur.num_shards)}, add=tuple(s.shard_id for s in spares))
        try:
            await self._apply(change, "scale out", "scale_out")
        except Exception as e:  # noqa: BLE001 - the spares stay spares for now
            failing, _ = self.backoffs.failed("scale out", str(e)[:1000], GROW_BACKOFF_MAX_S)
            self._event("grow_failed", error=failing.error[:EVENT_ERROR_CHARS], retry_in_s=failing.wait_s)
            return
        self.backoffs.succeeded("scale out")
