"""The controller's shard calls: health, stats, and make-before-break moves (load, publish, ack, then drop)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Coroutine

import grpc

from elasticmoe.autoscaler.registry import Change, Registry
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.options import channel_options

log = logging.getLogger("elasticmoe.controller")
ACK_TIMEOUT_S = 30.0  # old copies are dropped after this even if a gateway never acknowledged
DROP_GRACE_S = 0.5  # after the acks: steps that started on the old table finish
GATEWAY_TTL_S = 10.0  # a gateway that has not polled for this long is not waited for
DROP_TIMEOUT_S = 30.0  # a DropExperts call's deadline
LOAD_TIMEOUT_S = 300.0  # a LoadExperts call's deadline (a change with a deadline of its own: what is left of it)
# an event's error text: whole paths and tensor names (300 cut a tensor's name after a long checkpoint path)
EVENT_ERROR_CHARS = 1000
ROLLBACK_DROP_S = 1.0  # a failed load's roll back drops with at least this long even past the change's deadline
# (what does not go through waits for the health round's retry: _undropped)


def _left(deadline: float | None, cap: float, floor: float = 0.01) -> float:
    """A call's deadline in seconds: `cap`, or what is left to `deadline` (monotonic; None: none), >= `floor`."""
    return cap if deadline is None else min(cap, max(floor, deadline - time.monotonic()))


class LoadFailed(RuntimeError):
    """Loading new copies failed on some shard; whatever was loaded has been dropped again."""

    def __init__(self, message: str, addresses: tuple[str, ...] = (), codes: tuple = ()):
        super().__init__(message)
        self.addresses = addresses  # the shards whose LoadExperts failed
        self.codes = codes  # their status codes (grpc.StatusCode; None: not a gRPC failure)

    @property
    def unreadable(self) -> bool:
        """Every failed load was FAILED_PRECONDITION: the checkpoint cannot give an expert (a file damaged or gone,
        experts.errors.placement_code), which every try meets alike until the file is repaired."""
        return bool(self.codes) and all(c == grpc.StatusCode.FAILED_PRECONDITION for c in self.codes)


def _why(e: BaseException) -> str:
    """A failed call's code and message (an AioRpcError's repr buries them after a traceback's worth of noise)."""
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else f"{type(e).__name__}: {e}"


class Mover:
    """Mixin of the Controller: gRPC to the shards. Needs `registry`, `moe_layers`, `metrics`, `_lock`."""

    registry: Registry
    moe_layers: list[int]

    def __init__(self, insecure: bool = False, successor: bool = False) -> None:
        self.insecure = insecure  # plaintext to the shards (insecure_internal); mTLS otherwise
        if insecure:
            tls.warn_insecure("controller")
        self.renewal = tls.Renewal(insecure)  # renewed certificates: channels are replaced
        self._stubs: dict[str, pb_grpc.ExpertShardStub] = {}
        self._tasks: set[asyncio.Task] = set()  # running background tasks (a finished one is forgotten)
        self._lock: asyncio.Lock | None = None
        self.acks: dict[str, tuple[int, float]] = {}  # gateway id -> (table version it runs, when it said so)
        # A controller that follows another (a restart) has not heard from every gateway yet: one that has not polled
        # it may still run the old controller's table, so nothing is dropped before a gateway's TTL has passed.
        self.unheard_until = time.monotonic() + (GATEWAY_TTL_S if successor else 0.0)
        self.events: list[dict] = []
        self.event_counts: dict[str, int] = {}
        self.bytes_moved = 0
        self.loop_errors = 0
        self._undropped: dict[str, set[tuple[int, int]]] = {}  # shard id -> (model layer, expert) a drop left held

    def _stub(self, address: str) -> pb_grpc.ExpertShardStub:
        if self.renewal.changed():
            self._stubs.clear()
        if address not in self._stubs:
            # a new address: the channels of shards no longer registered go (closed when collected), so scale out
            # and in over new addresses keeps at most the registered shards' and those that left since the last one
            kept = {s.address for s in self.registry.shards.values()}
            self._stubs = {a: stub for a, stub in self._stubs.items() if a in kept}
            ch = tls.channel(address, channel_options(), insecure=self.insecure, aio=True)
            self._stubs[address] = pb_grpc.ExpertShardStub(ch)
        return self._stubs[address]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run `coro` as a background task, kept only while it runs; an exception it ends with is logged,
        counted in loop_errors and recorded as a `task_error` event."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        name = task.get_coro().__qualname__
        self.loop_errors += 1
        self._event("task_error", task=name, error=str(task.exception())[:EVENT_ERROR_CHARS])
        log.error("controller task %s failed", name, exc_info=task.exception())

    def _event(self, kind: str, **kw) -> None:
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        self.events.append({"t": time.time(), "event": kind, "version": self.registry.version, **kw})
        del self.events[:-500]
        log.info("%s %s", kind, kw)

    def _ack(self, gateway_id: str, version: int) -> None:
        """A gateway runs `version`; those silent for GATEWAY_TTL_S (not waited for, not shown) are forgotten."""
        now = time.monotonic()
        self.acks = {g: (v, t) for g, (v, t) in self.acks.items() if now - t < GATEWAY_TTL_S}
        self.acks[gateway_id] = (version, now)

    # ----- probes
    async def _alive(self, address: str, shard_id: str, timeout: float = 2.0) -> bool:
        """Health answered twice in a row by no one, or by another shard on a reused port: dead."""
        for attempt in range(2):
            try:
                r = await self._stub(address).Health(pb.HealthRequest(), timeout=timeout)
                return r.ok and r.shard_id == shard_id
            except grpc.RpcError:
                if attempt == 0:
                    await asyncio.sleep(0.2)
        return False

    async def _stats(self, address: str, timeout: float = 2.0):
        try:
            return await self._stub(address).GetStats(pb.GetStatsRequest(), timeout=timeout)
        except grpc.RpcError:
            return None

    async def _held(self, address: str, shard_id: str) -> set[tuple[int, int]] | None:
        """(model layer, expert) pairs the shard holds, or None when it does not answer as `shard_id`."""
        st = await self._stats(address)
        if st is None or st.shard_id != shard_id:
            return None
        return {(r.layer, r.expert) for r in st.held}

    async def _shard_stats(self, address: str) -> dict:
        r = await self._stats(address)
        if r is None:
            return {"stats_error": "unreachable"}
        return {"tokens": sum(t.tokens for t in r.tokens), "calls": r.calls, "weight_bytes": r.weight_bytes,
                "duplicate_tokens": sum(t.tokens for t in r.duplicates),  # of tokens: hedges, re-sends (stats.py)
                "compute_s": r.compute_us / 1e6, "held": len(r.held),
                "expert_tokens": [[t.layer, t.expert, t.tokens] for t in r.tokens]}

    # ----- loads and drops
    async def _load(self, address: str, pairs: list[tuple[int, int]], timeout: float | None = None) -> int:
        req = pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs],
                                    placement_version=self.registry.version + 1)
        return (await self._stub(address).LoadExperts(req, timeout=timeout or LOAD_TIMEOUT_S)).bytes

    async def _load_many(self, loads: dict[str, list[tuple[int, int]]], deadline: float | None = None) -> int:
        """Load on every shard at once; on any failure drop what the loads added (the failed ones may have loaded
        part of it) and raise LoadFailed. Copies a shard held before stay: a table that gateways still run may route
        to them (old copies waiting for the acks), and the drops after the acks remove them; a shard whose held
        copies are unknown keeps all of it for the retry (_roll_back). `deadline` (monotonic): the calls' deadlines
        are cut to it (a load past it fails; the roll back's drops get ROLLBACK_DROP_S)."""
        loads = {a: p for a, p in loads.items() if p}
        before = await asyncio.gather(*(self._stats(a) for a in loads))  # None: unknown
        results = await asyncio.gather(*(self._load(a, p, _left(deadline, LOAD_TIMEOUT_S)) for a, p in loads.items()),
                                       return_exceptions=True)
        failed = [(a, r) for a, r in zip(loads, results) if isinstance(r, BaseException)]
        if failed:
            await self._drop_now(self._roll_back(loads, before), _left(deadline, DROP_TIMEOUT_S, ROLLBACK_DROP_S))
            raise LoadFailed(f"LoadExperts failed on {failed[0][0]}: {_why(failed[0][1])}", tuple(a for a, _ in failed),
                             tuple(r.code() if isinstance(r, grpc.RpcError) else None for _, r in failed))
        return int(sum(results))

    def _roll_back(self, loads: dict[str, list[tuple[int, int]]], before: list) -> dict[str, list[tuple[int, int]]]:
        """What a failed load's roll back drops now, per address: what the load added (not held `before`). Where a
        shard's GetStats failed, what it held is unknown: a pair may be an old copy that a table gateways still run
        routes to (the controller keeps no older table), so its pairs are left to the retry (`_undropped`), which
        drops those its position is not assigned once every gateway runs the current table."""
        drops: dict[str, list[tuple[int, int]]] = {}
        for (address, pairs), st in zip(loads.items(), before):
            sids = [s.shard_id for s in self.registry.shards.values() if s.address == address]
            if st is not None or not sids:  # an address no shard is registered at: no table routes to it
                held = {(r.layer, r.expert) for r in st.held} if st is not None else set()
                drops[address] = [x for x in pairs if x not in held]
                continue
            for sid in sids:
                self._event("roll_back_deferred", shard=sid, experts=len(pairs))
                self._undropped.setdefault(sid, set()).update(pairs)
        return drops

    async def _drop_now(self, drops: dict[str, list[tuple[int, int]]], timeout: float | None = None) -> None:
        """Drop on every shard at once (under the lock: a shard that does not answer costs one deadline, not one
        for each shard after it); a failed drop is logged and left for the health round's retry (`_undropped`)."""
        await asyncio.gather(*(self._drop_on(a, pairs, timeout) for a, pairs in drops.items() if pairs))

    async def _drop_on(self, address: str, pairs: list[tuple[int, int]], timeout: float | None = None) -> bool:
        """Whether the drop went through; one that did not is left for the retry (`_undropped`)."""
        try:
            await self._stub(address).DropExperts(
                pb.DropExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs]),
                timeout=timeout or DROP_TIMEOUT_S)
            return True
        except grpc.RpcError as e:  # refused busy (its LoadExperts / DropExperts slots full), a deadline, gone
            log.warning("drop on %s failed: %s", address, e.code())
            for s in self.registry.shards.values():
                if s.address == address:
                    if s.shard_id not in self._undropped:
                        self._event("drop_failed", shard=s.shard_id, code=str(e.code()), experts=len(pairs))
                    self._undropped.setdefault(s.shard_id, set()).update(pairs)
            return False

    async def _drop_undropped(self) -> None:
        """Try the failed drops again (the health round starts it): once every gateway runs the current table (no
        older one may route to a copy it names; ACK_TIMEOUT_S at most, as for any drop), what a shard was left
        holding that its position is not assigned now is dropped; a shard that left needs none; what fails again
        waits for the next try, as does the whole try when a newer table comes meanwhile."""
        version = self.registry.version
        await self._acked(version)
        async with self._lock:
            if self.registry.version != version:
                return
            todo: dict[str, tuple[str, list[tuple[int, int]]]] = {}
            for sid, pairs in list(self._undropped.items()):
                info = self.registry.shards.get(sid)
                left = sorted(pairs - set(self.registry.assignment(info.position))) if info is not None else []
                if left:
                    todo[sid] = (info.address, left)
                else:
                    del self._undropped[sid]
            done = await asyncio.gather(*(self._drop_on(a, pairs) for a, pairs in todo.values()))
            for sid, ok in zip(todo, done):
                if ok:
                    self._undropped.pop(sid, None)

    # ----- one change, make-before-break
    async def _apply(self, change: Change, reason: str, kind: str = "rebalance", deadline: float | None = None) -> None:
        """Load the added copies, commit and publish the new table, then drop the old copies once every live
        gateway runs it; a shard still loading gets neither (its store is busy with its own load): it holds its new
        assignment before it is published (Controller.ready). A failed load changes nothing (raises LoadFailed).
        kind: the metrics' reason label (metrics.PLACEMENT_REASONS); `reason` goes to the event log; `deadline`: the
        loads' (_load_many)."""
        added, removed = change.current.diff(change.new)  # (layer, expert, new position)
        owners = {change.relabel.get(s.position, s.position): s for s in self.registry.shards.values()
                  if s.shard_id not in change.remove}
        for i, sid in enumerate(change.add):
            owners[change.current.num_shards + i] = self.registry.shards[sid]
        loads: dict[str, list[tuple[int, int]]] = {}
        for l, e, p in added:  # a shard still loading loads (and drops) what its position is assigned in ready()
            if owners[p].ready:
                loads.setdefault(owners[p].address, []).append((self.moe_layers[l], e))
        try:
            moved = await self._load_many(loads, deadline)
        except LoadFailed as e:
            self._event("load_failed", reason=reason, error=str(e)[:EVENT_ERROR_CHARS])
            raise
        self.bytes_moved += moved
        self.metrics.rebalance(moved, kind)
        self.registry.commit(change)
        self._save()
        version = self.registry.version
        self._event("placement", reason=reason, moves=len(added), dropped=len(removed), bytes=moved)
        drops: dict[str, list[tuple[int, int]]] = {}
        for l, e, p in removed:
            if p in owners and owners[p].shard_id not in change.remove and owners[p].ready:
                drops.setdefault(owners[p].shard_id, []).append((l, e))
        if drops:
            self._spawn(self._drop_after_acks(drops, version))

    async def _acked(self, version: int, timeout_s: float = ACK_TIMEOUT_S) -> bool:
        """Wait until every gateway seen lately has polled `version` (or newer), and every live one has been seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            fresh = [v for v, t in self.acks.values() if now - t < GATEWAY_TTL_S]
            if now >= self.unheard_until and all(v >= version for v in fresh):
                await asyncio.sleep(DROP_GRACE_S)
                return True
            await asyncio.sleep(0.05)
        return False

    async def _drop_after_acks(self, drops: dict[str, list[tuple[int, int]]], version: int) -> None:
        """Drop old copies (placement layer, expert) per shard id once every gateway runs the current table, unless
        a later placement put them back. A table published meanwhile is waited for in turn: one between may have put
        a copy back that the newest moved off again, and a gateway running it still routes there."""
        while True:
            if not await self._acked(version):
                self._event("ack_timeout", version=version)
            async with self._lock:
                if self.registry.version == version:
                    await self._drop_acked(drops)
                    return
            version = self.registry.version

    async def _drop_acked(self, drops: dict[str, list[tuple[int, int]]]) -> None:
        """(Under the lock, every gateway running the current table.) The drops of _drop_after_acks."""
        by_id = self.registry.shards
        todo = {}
        for sid, pairs in drops.items():
            info = by_id.get(sid)
            if info is None:
                continue
            keep = set(self.registry.placement.experts_on(info.position))
            todo[info.address] = [(self.moe_layers[l], e) for l, e in pairs if (l, e) not in keep]
        await self._drop_now(todo)
