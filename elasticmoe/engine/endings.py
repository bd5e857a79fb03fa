"""A request's end short of finishing (abort, failure): its K/V zeroed, or its slot and blocks held until they are."""

from __future__ import annotations

import logging
from collections.abc import Hashable

from elasticmoe.engine.scheduler import RequestFailed, Scheduler, Sequence, Status
from elasticmoe.model.dispatch import ExpertsUnavailable
from elasticmoe.model.kv_cache import KVCache

log = logging.getLogger("elasticmoe.engine.engine")  # the engine's: its requests' lines under one name


class Endings:
    """Ends the requests of an engine (its `scheduler`, `cache`, and `seqs`: request_id -> Sequence, shared with it)
    that did not finish by themselves. `held`: slot -> positions to zero, the slots whose zeroing raised as their
    request ended, given to no one (their blocks held too, by ("held", slot) in the pool) until `zero_held` zeroes
    them; `failed`: the requests ended by a failure (RequestFailed)."""

    def __init__(self, scheduler: Scheduler, cache: KVCache, seqs: dict[str, Sequence]):
        self.scheduler, self.cache, self.seqs = scheduler, cache, seqs
        self.held: dict[int, int] = {}
        self.failed = 0

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV-cache slot at once."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.release(seq, "abort")

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """End this request only: the client gets UNAVAILABLE / HTTP 503, never the raw internal error. `error` stays
        (seq.error's cause) without tracebacks, its own and those of the errors it was raised in the handling of:
        their frames (the step's, the forward's tensors among their locals) hold `seq`, a cycle that only a full
        garbage collection frees, which a serving process may not run for minutes."""
        _drop_tracebacks(error)
        seq.error = self.failure(seq.request_id, error)
        self.release(seq, "abort")
        self.forget(seq)

    def failure(self, request_id: str, error: BaseException) -> RequestFailed:
        """What the client of a request that failed on `error` is told (counted in `failed`)."""
        if isinstance(error, ExpertsUnavailable):  # its `public` cause where it has one (e.g. a message limit)
            msg = error.public or "some experts are unavailable (every copy failed); retry later"
        else:
            msg = "the request could not be served (its part of an engine step failed); retry later"
            log.error("request %s failed: %r", request_id, error)
        out = RequestFailed(msg)
        out.__cause__ = error
        self.failed += 1
        return out

    def forget(self, seq: Sequence) -> None:
        """Drop `seq` from `seqs` if it is still there: its id may be another request's since (it ended, the id
        was taken again) while someone held on to it (a late fail)."""
        if self.seqs.get(seq.request_id) is seq:
            del self.seqs[seq.request_id]

    def release(self, seq: Sequence, reason: str) -> None:
        """End a request that did not finish by itself; the K/V it wrote are zeroed, as they may hold the NaN
        or inf of a numerical fault that the next request in its slot would read (masked, yet summed). Should the
        zeroing raise (a device error), the request ends all the same and its slot is held back, given to no one
        until the next step zeroes it: one request's end never fails (its abort, or its failure, would)."""
        slot = seq.slot if seq.status is Status.RUNNING else None
        if slot is not None:
            self.zero(slot, min(seq.num_tokens, self.cache.max_len), seq)
        self.scheduler.finish(seq, reason)
        if slot in self.held and slot in self.scheduler.free_slots:
            self.scheduler.free_slots.remove(slot)

    def preempt(self, seq: Sequence) -> bool:
        """The scheduler preempts running `seq` (Scheduler.on_preempt): zero the K/V it wrote as an abort does (a
        chunk not yet followed by a draw may hold a numerical fault's NaN, that the blocks' next owner would read
        masked), less its cached blocks, kept cached (they were registered once a draw after them came out clean,
        and its recompute may find them); whether its slot is free now (not held back: its zeroing raised)."""
        self.zero(seq.slot, min(seq.num_tokens, self.cache.max_len), seq, uncache=False)
        return seq.slot not in self.held

    def zero(self, slot: int, length: int, owner: Hashable, uncache: bool = True) -> None:
        """Zero a slot's first `length` positions; should that raise (a device error), the slot is held back (out of
        free_slots, if there) until the next step zeroes it, where a failure is the engine's, and with it the
        blocks of `owner` (its sequence), which its end would have freed. The blocks zeroed are those the pool
        has for `owner` (BlockPool.to_zero: not the table's row, which a Ctrl-C before the step's assignment left
        naming another's), less those others hold or the prefix cache keeps; what `owner` wrote is cached no more
        (`uncache`; a preemption's keep theirs)."""
        try:
            self._clear(slot, length, owner, uncache)
        except Exception:  # noqa: BLE001 - retried by the next step (zero_held)
            log.exception("zeroing KV-cache slot %d failed; it is held back until a step zeroes it", slot)
            if slot not in self.held:
                self.scheduler.pool.transfer(owner, ("held", slot))
            self.held[slot] = max(length, self.held.get(slot, 0))
            if slot in self.scheduler.free_slots:
                self.scheduler.free_slots.remove(slot)

    def zero_held(self) -> None:
        """Zero the slots held back (their zeroing failed as their request ended) and free them. Failing again, it
        raises, as the step does: a device that cannot zero its memory is every request's failure, not one's. A slot
        is unlisted last: a pass cut short (Ctrl-C) is completed by the next, its slot and blocks free or held."""
        for slot, length in list(self.held.items()):
            self._clear(slot, length, ("held", slot))
            self.scheduler.pool.release(("held", slot))  # (again, nothing: release is idempotent)
            if slot not in self.scheduler.free_slots:
                self.scheduler.free_slots.append(slot)
            del self.held[slot]

    def _clear(self, slot: int, length: int, owner: Hashable, uncache: bool = True) -> None:
        """Zero the positions [0, length) that `owner` wrote in its blocks (and the slot's linear states)."""
        pool = self.scheduler.pool
        if uncache:
            pool.uncache_written(owner)
        self.cache.clear(slot, length, pool.to_zero(owner, pool.blocks_for(length)))


def _drop_tracebacks(error: BaseException) -> None:
    """Drop the tracebacks of `error` and of every error in its __cause__ and __context__ chains."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.__traceback__ = None
            todo += [e.__cause__, e.__context__]
