"""One layer's expert calls in flight: failover, hedging and waiting for a new table, all inside the step."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc
import torch

from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.step_groups import Call, Group, by_lacks, by_shard, only_rows, short_only
from elasticmoe.gateway.transport import is_busy, is_oversize, is_short
from elasticmoe.rpc.frame_types import as_tensor

if TYPE_CHECKING:
    from elasticmoe.gateway.dispatcher import GrpcDispatcher

log = logging.getLogger(__name__)
BUSY_RETRY_S = 0.05  # a full shard ("shard busy") is not asked again for these moments within the step


class Step:
    """The pending output of one dispatch(); `wait()` returns the combined [T, H]."""

    def __init__(self, d: "GrpcDispatcher", layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.d, self.layer, self.hidden, self.weights = d, layer, hidden, topk_weights  # hidden [T, H]
        self.topk_ids, self.device, self.dtype = topk_ids, device, dtype
        self.dead: set[str] = set()  # shards that failed during this step
        self.groups: list[Group] = []
        self.straggled: set[str] = set()  # shards whose calls were hedged during this step
        self.t0 = time.perf_counter()
        self.detected_s: float | None = None  # when the first failure (or straggler hedged) of this step was seen
        self.fatal: Exception | None = None  # what ends the step at once (a shard that takes no call of one row)
        self.short: dict[str, str] = {}  # shards out of memory for a call of this step -> what they answered

    # ----- routing
    def _route(self, table: RoutingTable, ids: torch.Tensor,
               hard: set[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shard_of [T, k], lost [T, k] bool, None where nothing is lost): `hard` always avoided; suspects where
        another copy exists, and where only suspects are left, the shards owing hedged-around answers (stuck) before
        those that merely straggled."""
        excl = table.index_of(hard)
        first = excl | self.d.suspected(table)
        shard_of = table.assign(self.layer, ids, first, self.d.steps)
        if table.covers(self.layer, first):  # every expert has a live copy: only ids -1 have no shard
            return shard_of, None
        lost = (shard_of < 0) & (ids >= 0)
        for fallback in (excl | table.index_of(self.d.stuck()), excl):
            if not bool(lost.any()):
                break
            again = table.assign(self.layer, torch.where(lost, ids, -1), fallback, self.d.steps)
            shard_of = torch.where(lost, again, shard_of)
            lost = (shard_of < 0) & (ids >= 0)
        return shard_of, lost

    def _issue(self, table: RoutingTable, ids: torch.Tensor, shard_of: torch.Tensor,
               duplicate: bool = False) -> list[tuple[torch.Tensor, Call]]:
        """One call per shard in shard_of [T, k] (-1: none): (the ids it covers [T, k], -1 elsewhere; the call), each
        sent as a `duplicate` (its slots counted as routed demand elsewhere) if so."""
        out = []
        for s, rows, covered, sent in by_shard(shard_of, ids):  # rows [T_s], covered [T, k], sent [T_s, k]
            most = self.d.max_call_rows(self.hidden, ids.shape[1], table.addresses[s])
            for part in [rows] if rows.numel() <= most else rows.split(most):  # each call within the message limit
                whole = part is rows
                part_ids = covered if whole else only_rows(covered, part)  # [T, k]
                out.append((part_ids, self.d.send(table, self.layer, s, self.hidden, part,
                                                  sent if whole else covered.index_select(0, part),
                                                  self.weights.index_select(0, part), duplicate)))
        return out

    def _split(self, table: RoutingTable, ids: torch.Tensor, hard: set[str],
               busy: dict[str, float] | None = None, counted: bool = False) -> list[Group]:
        """Groups covering ids [T, k]: one per shard call, plus one waiting group for slots with no live copy.
        `hard` are never asked; `busy` (shard -> until when) not before their time; `counted`: a shard counted these
        slots already (Group.counted), so the calls are duplicates."""
        now, busy = time.perf_counter(), busy or {}
        shard_of, lost = self._route(table, ids, hard | {s for s, until in busy.items() if until > now})
        any_lost = lost is not None and bool(lost.any())
        if any_lost:
            issued = self._issue(table, torch.where(lost, -1, ids), torch.where(lost, -1, shard_of), counted)
        else:
            issued = self._issue(table, ids, shard_of, counted)
        groups = [Group(covered, [call]) for covered, call in issued]
        if any_lost:
            groups.append(Group(torch.where(lost, ids, -1), None))
        for g in groups:
            g.tried |= hard
            g.busy = dict(busy)
            g.counted = counted
        return groups

    def start(self, table: RoutingTable) -> None:
        self.groups = self._split(table, self.topk_ids, set())

    # ----- answers
    def _take(self, g: Group, attempt: int, c: Call) -> None:
        """Record c's answer (or failure) in group g's attempt. The failure is read, never raised: a raise would
        give it a traceback through this frame (the step) and its callers (the forward's tensors), a cycle through
        c.future that only a full garbage collection frees; and one error object fails all of a broken
        connection's calls, each raise adding the frames of its step to that one traceback."""
        if not c.done_at:  # a waiter woken before the future's callbacks ran (another thread resolved it)
            c.done_at = time.perf_counter()
        e = c.future.exception()
        if e is not None:  # any failure of the call but a refusal (busy) is that shard's
            if is_busy(e) or is_oversize(e):
                log.info("shard %s refused a call at layer %d: %s", c.shard_id, self.layer, e.details())
                self._refused(g, attempt, c, busy=is_busy(e))
                return
            if is_short(e):
                log.warning("shard %s is out of memory at layer %d: %s", c.shard_id, self.layer, e.details())
                self._short(g, attempt, c.shard_id, e.details())
                return
            code = e.code() if isinstance(e, grpc.RpcError) else type(e).__name__
            # what the shard said: a refused frame (another release's, a checkpoint of other shapes) is named only here
            said = e.details() if hasattr(e, "details") else str(e)
            log.warning("shard %s failed at layer %d: %s: %.300s", c.shard_id, self.layer, code, said)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # a live but slow shard computes (and counts) it late:
                g.counted |= not c.duplicate  # its re-sends are duplicates (one that never ran counts nowhere)
            self._fail(g, attempt, c.shard_id, report=True)
            return
        resp = c.future.result()
        if resp.missing:  # the placement moved these experts: another copy takes them, this shard the rest
            g.lacks.setdefault(c.shard_id, set()).update(int(x) for x in resp.missing)
            self._fail(g, attempt, None, report=False)
            return
        try:
            out = as_tensor(resp.output, "RunExpertsResponse.output")
        except ValueError as e:
            out, why = None, str(e)
        if out is None or out.shape != (c.rows.numel(), self.hidden.shape[1]) or not out.is_floating_point():
            if out is not None:
                why = f"shape {list(out.shape)} dtype {out.dtype}, want [{c.rows.numel()}, {self.hidden.shape[1]}]"
            log.warning("shard %s answered layer %d malformed: %s", c.shard_id, self.layer, why)
            g.counted |= not c.duplicate  # it computed (and counted) the group's slots: their re-sends are duplicates
            self._fail(g, attempt, c.shard_id, report=True)
            return
        c.output, c.compute_s = out, resp.compute_us / 1e6  # float64 from our shards
        self.d.note_latency(max(0.0, c.done_at - c.sent_at))  # its own round trip (re-sent, hedged: not the step's)

    def _fail(self, g: Group, attempt: int, shard_id: str | None, report: bool) -> None:
        g.broken.add(attempt)
        if shard_id is not None:
            g.tried.add(shard_id)
        if report:
            if self.detected_s is None:
                self.detected_s = time.perf_counter() - self.t0
            self.dead.add(shard_id)
            self.d.suspect(shard_id, report=True)
        self.d.failovers += 1

    def _refused(self, g: Group, attempt: int, c: Call, busy: bool) -> None:
        """A full shard (`busy`) refused the call: another copy takes it, else this shard again after BUSY_RETRY_S,
        and it is suspected for suspect_s (other copies first). A call larger than the shard takes (its limit was
        learnt meanwhile) is split anew at once; one of a single row, where that limit is below one row, ends the
        step (no call fits: asking again would repeat until failover_s; a stream's other frames, failed with the
        one too large, are split anew). Either way the shard is alive: not dead for the step, not reported."""
        g.broken.add(attempt)
        if busy:
            g.busy[c.shard_id] = time.perf_counter() + BUSY_RETRY_S
            self.d.suspect(c.shard_id, report=False)
        elif c.rows.numel() == 1 and self.d.rows_within(self.hidden, self.topk_ids.shape[1], c.address) == 0:
            self.fatal = self.d.row_too_large(self.layer, c.shard_id, c.address)
        self.d.failovers += 1

    def _short(self, g: Group, attempt: int, shard_id: str, why: str) -> None:
        """The shard ran out of memory for the call (RESOURCE_EXHAUSTED, not busy): it is alive (not dead for the step,
        not reported), but the same tokens may not fit it again: another copy takes them, and it is suspected for
        suspect_s (other copies first). Where no other copy is left, the step ends (_short_only)."""
        g.broken.add(attempt)
        g.tried.add(shard_id)
        self.short[shard_id] = why
        self.d.suspect(shard_id, report=False)
        self.d.failovers += 1

    def _short_only(self, table: RoutingTable, ids: torch.Tensor, hard: set[str]) -> None:
        """ids [T, k] found no live copy: where some have copies only on shards out of memory this step, the step
        ends now (ShortOfMemory): no table the controller publishes adds one for that (it was not told)."""
        short = hard & self.short.keys()
        if short and short_only(table, self.layer, ids, hard, short):
            self.fatal = self.d.short_of_memory(self.layer, {s: self.short[s] for s in sorted(short)})

    def _poll(self) -> None:
        for g in self.groups:
            if g.winner is not None:
                continue
            for i, attempt in enumerate(g.attempts):
                if i in g.broken:
                    continue
                for c in attempt:
                    if c.output is None and c.future.done() and i not in g.broken:
                        self._take(g, i, c)
                if i not in g.broken and all(c.output is not None for c in attempt):
                    g.winner = attempt
                    break

    # ----- recovery
    def _replace_orphans(self) -> None:
        """Groups with no live attempt are split anew over the newest table (their failed shards excluded)."""
        table = self.d.latest()
        out: list[Group] = []
        for g in self.groups:
            if g.winner is None and not g.live():
                for ids, lacking in by_lacks(g):
                    hard = g.tried | self.dead | lacking
                    fresh = self._split(table, ids, hard, g.busy, g.counted)
                    if len(fresh) == 1 and not fresh[0].attempts:  # still nothing live: keep waiting
                        fresh[0].started = g.started
                    if not fresh[-1].attempts and self.short:  # the last: its slots with no live copy
                        self._short_only(table, fresh[-1].ids, hard)
                    out.extend(fresh)
            else:
                out.append(g)
        self.groups = out

    def _hedge(self) -> float:
        """Hedge groups whose only attempt straggles, when other copies can take all of it; returns the next check."""
        after, now = self.d.hedge_after_s(), time.perf_counter()
        table = self.d.latest()
        nxt = after
        for g in self.groups:
            live = g.live()
            if g.winner is not None or g.hedged or len(live) != 1:
                continue
            age = now - g.started
            if age < after:
                nxt = min(nxt, after - age)
                continue
            if g.hedge_tried == (table.epoch, table.version):
                continue  # no other copy in this table: wait for the straggler, its deadline or a newer table
            straggling = [c for c in live[0] if c.output is None]
            slow = {c.shard_id for c in straggling}
            # never onto a shard owing a hedged-around answer: it would not answer, and the straggler (perhaps only
            # slowed by a busy host) would be suspected in its place, costing the next steps a hedge delay each
            shard_of, lost = self._route(table, g.ids, g.tried | self.dead | slow | self.d.stuck())
            if lost is not None and bool(lost.any()):
                g.hedge_tried = (table.epoch, table.version)  # a re-home (controller) may add copies: try that table
                continue
            g.hedged = True  # the straggler counts the slots as routed demand if it computes them, the hedge does not
            calls = [c for _, c in self._issue(table, g.ids, shard_of, duplicate=True)]
            g.attempts.append(calls)
            self.d.hedges += 1
            if self.detected_s is None:
                self.detected_s = now - self.t0
            self.straggled |= slow
            for s in slow:
                self.d.suspect(s, report=False)
            for c in straggling:
                self.d.straggling(c.shard_id, c.future)
        return max(0.001, nxt)

    def wait(self) -> torch.Tensor:
        """Collect every group's winning answers and combine them in a fixed order: [T, H] in the input dtype."""
        deadline = self.t0 + self.d.failover_s
        while True:
            self._poll()
            if self.fatal is not None:
                raise self.fatal
            undone = [g for g in self.groups if g.winner is None]
            if not undone:
                break
            if any(not g.live() for g in undone):
                self._replace_orphans()
                if self.fatal is not None:
                    raise self.fatal
                undone = [g for g in self.groups if g.winner is None]
            if time.perf_counter() > deadline:
                raise self.d.unavailable(f"layer {self.layer}: experts unavailable for {self.d.failover_s:.0f} s")
            timeout = min(self._hedge(), 0.02 if any(not g.live() for g in undone) else 1.0)
            # after _hedge: a hedge just sent is among the calls waited on (else the wait sat out its timeout)
            pending = [c.future for g in undone for a in g.live() for c in a if c.output is None]
            if pending:
                self.d.transport.wait(pending, timeout)  # may read the answers on this thread
            else:
                time.sleep(timeout)
        return self._combine()

    def _combine(self) -> torch.Tensor:
        out = torch.zeros(self.hidden.shape, dtype=torch.float64)  # [T, H]; float64 like the shards' sums
        compute, finished = 0.0, self.t0
        for g in self.groups:
            for c in g.winner:
                part = c.output  # [T_s, H]: float64 from our shards (no conversion then)
                out.index_add_(0, c.rows, part if part.dtype == torch.float64 else part.to(torch.float64))
                compute, finished = max(compute, c.compute_s), max(finished, c.done_at)
                self.d.shard_tokens[c.shard_id] = self.d.shard_tokens.get(c.shard_id, 0) + int(c.rows.numel())
        self.d.record(max(0.0, (finished - self.t0) - compute))
        if self.dead or self.straggled:  # how long the fault took to see, and to get around (fault tests, stalls)
            self.d.fault_log.append({"at": time.time(), "layer": self.layer, "dead": sorted(self.dead),
                                     "straggled": sorted(self.straggled), "detected_s": self.detected_s,
                                     "done_s": time.perf_counter() - self.t0})
        return out.to(device=self.device, dtype=self.dtype)
