"""The controller's health rounds: probes and verdicts that never wait for a change in progress, then what they call
for (a re-home, a revival, a given-up start, a scale out, drops to retry) under the controller's lock."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.autoscaler.registry import Registry, ShardInfo


class HealthKeeper:
    """Mixin of the Controller. The probe round (`_probe_once`) takes no lock: a shard found dead is out of the table
    at once (`_mark_failed`: a flag and a new version, which a change in progress commits around, as it does a
    heartbeat's move), and its verdict waits in `_verdicts` for the settle round (`_settle_once`, woken by each
    probe round), which re-homes it once the lock is free. So a scale out loading a whole shard, or a re-home, delays
    the re-home of a shard that dies meanwhile, not the verdict that takes it out of the table. Needs the
    Controller's state and the Mover's and Replacer's calls."""

    registry: Registry
    recovering: bool
    _lock: asyncio.Lock | None
    _verdicts: dict[str, tuple[ShardInfo, int, bool]]  # shard id -> (its info, `seen` at the probe, answered)
    _wake: asyncio.Event  # set by each probe round: the settle round runs
    _retry: asyncio.Task | None = None  # the running retry of failed drops (one at a time)

    async def report_failure(self, shard_id: str) -> dict:
        """A gateway's call to this shard failed: check it soon (not under this call); return the table."""
        lock = self._start()
        info = self.registry.shards.get(shard_id)
        if info is not None and info.healthy:
            self._spawn(self._check_one(shard_id, lock))  # referenced while it runs: not garbage-collected
        return self._table()

    async def _check_one(self, shard_id: str, lock: asyncio.Lock) -> None:
        info = self.registry.shards.get(shard_id)
        if info is None:
            return
        seen = info.seen
        if await self._alive(info.address, shard_id):
            return
        if self._current(info, seen):
            self._mark_failed([info], "call failed")  # out of the table now, not after a change in progress
        async with lock:
            if self._current(info, seen):
                await self._lose(shard_id, "call failed")

    def _current(self, info: ShardInfo, seen: int) -> bool:
        """A verdict of a probe that began at `seen` is about the shard as it still is: the same registration (not
        one re-registered under its id since), not found good again nor moved since the probe began."""
        return self.registry.shards.get(info.shard_id) is info and info.seen == seen

    async def _health_once(self) -> None:
        """One whole health round: the probes, then what their verdicts call for (the loops run the two apart)."""
        await self._probe_once()
        await self._settle_once()

    async def _probe_once(self) -> None:
        """Check every registered shard at once, never under the lock: the dead are marked failed (out of the
        table) at once, all of them first, so that re-homing one does not plan copies onto another (whose loads
        would fail); every verdict is left for the settle round."""
        infos = list(self.registry.shards.values())
        seen = [i.seen for i in infos]  # a verdict counts only for the shard as it was when its probe began
        alive = await asyncio.gather(*(self._alive(i.address, i.shard_id) for i in infos))
        self._mark_failed([i for i, s, ok in zip(infos, seen, alive) if not ok and self._current(i, s)],
                          "health check failed")
        for info, s, ok in zip(infos, seen, alive):
            self._verdicts[info.shard_id] = (info, s, ok)  # the latest verdict on a shard replaces an older one
        self._overdue()  # the start clocks run on while a change holds the lock
        self._wake.set()

    def _to_settle(self) -> list[tuple[ShardInfo, int, bool]]:
        """The verdicts that call for a change: a shard that answers again, one found dead as it still is."""
        return [(i, s, ok) for i, s, ok in self._verdicts.values()
                if (ok and not i.healthy and self.registry.shards.get(i.shard_id) is i)
                or (not ok and self._current(i, s))]

    async def _settle_once(self) -> None:
        """(Takes the lock, only when there is work.) Lose the dead, revive the paused, give up the positions that
        never came up, place the ready spares; start a retry of failed drops; end the back-offs of failed decisions
        no longer called for (Replacer._forget_settled)."""
        if self._undropped and (self._retry is None or self._retry.done()):
            self._retry = self._spawn(self._drop_undropped())
        self._forget_settled()
        if not (self._to_settle() or self.registry.spares() or self._overdue()):
            self._verdicts.clear()
            return
        async with self._lock:
            todo = self._to_settle()  # the verdicts as they are now: probes may have landed while it waited
            self._verdicts.clear()
            for info, s, ok in todo:
                if ok and not info.healthy and self.registry.shards.get(info.shard_id) is info:
                    await self._revive(info)  # probes it again itself
                elif not ok and self._current(info, s):
                    await self._lose(info.shard_id, "health check failed")
            overdue = self._overdue()
            if overdue and self.registry.live() and not self.recovering:
                await self._give_up(overdue)
            if self.registry.spares() and not self.recovering:  # ready spares that a failed scale out left unplaced
                await self._grow(retry=True)
            self._forget_settled()  # what this round settled (a shard revived) ends the back-offs it called for

    def _overdue(self) -> list[int]:
        """Positions of the placement without a live shard for autoscaling's start_deadline_s (none without
        autoscaling: its fixed count is waited for)."""
        auto = self.args.autoscaling
        if auto is None or auto.start_deadline_s is None:
            return []
        return self.registry.overdue(time.monotonic(), auto.start_deadline_s)
