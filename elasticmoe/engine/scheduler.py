"""Continuous batching: sequences join the running batch at any step and leave when done; bounded admission."""

from __future__ import annotations

import math
from collections import deque
from typing import Callable

from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.prefix_cache import block_keys
from elasticmoe.engine.sequence import RequestFailed, Sequence, Status  # noqa: F401 - RequestFailed: imported from here


# Admission beside running sequences leaves this share of the KV blocks free (at least one; Scheduler._spare), room
# for them to grow into: admitting up to the last block had the next block boundary preempt the newcomer, its
# prefill wasted (vLLM's watermark, 1%, likewise)
WATERMARK = 0.01


class QueueFull(RuntimeError):
    """The waiting queue is full (mapped to RESOURCE_EXHAUSTED / HTTP 429)."""


class Scheduler:
    """Picks each step's work: running decodes (all of them while the budget allows), unfinished prefills, then new
    sequences while slots, KV-cache blocks and the budget last (_admit). `pool`: the KV cache's blocks, of which a
    sequence is admitted once it can reserve those of its tokens (its prompt), in arrival order (the first waiting
    one waits for blocks, those after it too); a running one gets one more as its next token crosses a block
    boundary, and where too few are free the newest running ones are preempted (vLLM's recompute): their blocks and
    slots given back (`on_preempt(seq)` first: the engine zeroes what it wrote, and says whether its slot is free),
    they go back to the front of `waiting`, to be admitted again over prompt and outputs. Its end (finish) gives
    them back. None: no blocks counted. `prefix_caching`: a sequence shares the cached blocks its tokens start with
    (all but its last token at most: one is always run, to draw from) and runs from their end; its own full blocks,
    of its prompt and of its outputs, are cached as a token is drawn after them (`written`); one waiting for a
    prefix that another is prefilling beside it is passed over for a step (_passed_over)."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_queue: int,
                 pool: BlockPool | None = None, prefix_caching: bool = False):
        self.pool = pool
        self.prefix_caching = prefix_caching and pool is not None
        self.max_tokens = max_num_batched_tokens
        self.max_queue = max_queue
        self.num_slots = max_num_seqs  # KV-cache slots, one a sequence: free, a running sequence's, or held back
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0  # schedule() calls: Sequence.scheduled_at counts in them
        self.preemptions = 0  # running sequences preempted for blocks (their tokens recomputed later)
        self.on_preempt: Callable[[Sequence], bool] | None = None  # the engine's: zero it, and is its slot free?
        self._preempting: Sequence | None = None  # a preemption under way: _settle completes one cut short

    def add(self, seq: Sequence, held: int = 0) -> None:
        """Queue `seq`; QueueFull past max_queue waiting beyond the free slots. `held`: slots out of free_slots for
        now (the engine's, being zeroed) that the next step frees: counted free, so what is admitted waits its turn."""
        if len(self.waiting) >= self.max_queue + len(self.free_slots) + held:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, budget: int | None = None) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to run this step) pairs; prefills may be chunked to fit the token budget (`budget`, the
        engine's while it holds one lower, else max_num_batched_tokens)."""
        self._settle()
        self.steps += 1
        self._grow()
        budget = self.max_tokens if budget is None else budget
        work = [(seq, 1) for seq in self._decodes(budget)]  # decodes first: one token each, never starved by prefills
        budget -= len(work)
        for seq in self.running:  # unfinished (chunked) prefills
            todo = seq.num_tokens - seq.num_cached
            if todo > 1 and budget > 0:
                n = min(todo, budget)
                work.append((seq, n))
                budget -= n
        self._admit(work, budget)
        for seq, _ in work:
            seq.scheduled_at = self.steps
        return work

    def _admit(self, work: list[tuple[Sequence, int]], budget: int) -> None:
        """Admit waiting sequences while slots, blocks and the budget last, in arrival order (their work appended to
        `work`): the first that cannot reserve its blocks waits, those after it too; one waiting for a prefix being
        prefilled beside it is passed over (_passed_over), and those after it that share no block with it may go."""
        passed: set[bytes] = set()  # the first blocks of the sequences passed over
        i = 0  # waiting[:i]: passed over this step (first in line the next)
        while i < len(self.waiting) and self.free_slots and budget > 0:
            seq = self.waiting[i]  # it and its slot stay listed until it runs: a Ctrl-C up to here loses neither
            if self._passed_over(seq, passed):
                i += 1
                continue
            order = self.waiting
            if i:  # first, in one assignment (_settle admits waiting[0]); the rest in arrival order
                self.waiting = deque([seq, *(s for s in order if s is not seq)])
            if not self._reserve(seq):  # its blocks are its own from here (kept if cut short: finish frees them)
                self.waiting = order  # (back in its place: unchanged, as nothing else ran)
                return
            seq.slot, seq.status = self.free_slots[-1], Status.RUNNING
            self.running.append(seq)  # the admission: _settle completes it from here
            self._settle()
            n = min(seq.num_tokens - seq.num_cached, budget)
            work.append((seq, n))
            budget -= n

    def _reserve(self, seq: Sequence) -> bool:
        """Reserve the KV-cache blocks of seq's tokens (its prompt; a preempted one's outputs too); whether it holds
        them. Its positions run from 0, or, prefix caching, from the end of the cached blocks its tokens start with
        (among them; a preempted one's own, of prompt and outputs, where not evicted since; counted in its usage and
        the pool's lookups at its first admission only). Again, as an admission cut short is repeated: the same."""
        pool = self.pool
        if pool is None:
            return True
        n, prompt, first = pool.blocks_for(seq.num_tokens), len(seq.prompt_ids), not seq.preempted
        spare = self._spare(seq, n)
        if not self.prefix_caching:
            if not pool.reserve(seq, n, spare=spare):
                return False
            seq.num_cached = 0
            return True
        keys = self._keys(seq)
        if not pool.reserve(seq, n, keys, query=prompt if first else 0, spare=spare):
            return False
        seq.registered = pool.hits(seq)
        seq.num_cached = seq.registered * pool.block_size
        if first:
            seq.cached_tokens = seq.num_cached
        return True

    def _keys(self, seq: Sequence) -> list[bytes]:
        """The keys of the blocks seq may find cached: its full blocks, all but its last token (one always runs)."""
        size = self.pool.block_size
        return self._chain(seq, seq.num_tokens // size)[:(seq.num_tokens - 1) // size]

    def _chain(self, seq: Sequence, n: int) -> list[bytes]:
        """seq.block_keys, the keys of its first n full blocks (n <= num_tokens // block_size) at least: its hash chain
        continued over its tokens (prompt, then outputs) as far as needed, in one assignment."""
        keys, size = seq.block_keys or [], self.pool.block_size
        if len(keys) < n:
            start, end, p = len(keys) * size, n * size, len(seq.prompt_ids)
            tokens = seq.prompt_ids[start:end] + seq.output_ids[max(start - p, 0):max(end - p, 0)]
            keys = keys + block_keys(tokens, size, keys[-1] if keys else b"")
            seq.block_keys = keys
        return keys

    def _passed_over(self, seq: Sequence, passed: set[bytes]) -> bool:
        """Prefix caching: whether waiting seq is passed over this step, as it waits for a prefix being prefilled
        beside it (_prefilled_beside), or starts as one that does (its first block in `passed`, to which it is
        added): it keeps its place, and those after it that share no block with it may be admitted before it
        (SGLang's). No starvation: one admitted ahead of it shares no block with it, so it never waits for one
        (only for those running before, each prefill finite), and it goes before those that share its prefix."""
        if not self.prefix_caching:
            return False
        keys = self._keys(seq)
        if not (keys and keys[0] in passed or self._prefilled_beside(seq)):
            return False
        passed.add(keys[0])
        return True

    def _prefilled_beside(self, seq: Sequence) -> bool:
        """Prefix caching: whether a running sequence is prefilling the prompt blocks seq starts with, not cached yet,
        and at least half of what seq would run: seq waits for them to be cached (as its first token is drawn)
        rather than compute them a second time beside it (SGLang's in-batch prefix caching; n > 1 choices, a burst of
        chats under one system prompt). Only a sequence still prefilling counts: it draws, or leaves `running`."""
        if not self.prefix_caching or seq.preempted:
            return False
        size, keys = self.pool.block_size, self._keys(seq)  # those it could find cached
        for other in self.running:
            if not keys or other.block_keys is None or other.registered >= min(len(keys), len(other.block_keys)):
                continue
            shared = next((i for i, (a, b) in enumerate(zip(keys, other.block_keys)) if a != b),
                          min(len(keys), len(other.block_keys)))
            gain = (shared - other.registered) * size  # its tokens that other's prefill will cache
            if gain > 0 and 2 * gain >= seq.num_tokens - other.registered * size:
                return True
        return False

    def _spare(self, seq: Sequence, n: int) -> int:
        """Blocks the admission of seq (n blocks) leaves free: the watermark, less where the running sequences and
        seq could never grow into that many more (their prompts and max_tokens: a cache that holds them all whole,
        as the default does, blocks no admission); none beside no running one (alone, it fits)."""
        if not self.running:
            return 0
        pool = self.pool
        most = (pool.blocks_for(len(s.prompt_ids) + s.params.max_tokens) for s in self.running)
        growth = sum(most) - sum(len(pool.blocks(s)) for s in self.running)
        growth += pool.blocks_for(len(seq.prompt_ids) + seq.params.max_tokens) - n
        return min(math.ceil(pool.num_blocks * WATERMARK), max(growth, 0))

    def _grow(self) -> None:
        """Each running sequence, the oldest first, holds the blocks of all its tokens (a decode's next position may
        cross a block boundary); short of free blocks, the newest running ones are preempted until it does (itself
        last: never an older one; the oldest always fits, as validation keeps prompt + max_tokens in the cache)."""
        if self.pool is None:
            return
        for seq in list(self.running):
            while seq.status is Status.RUNNING and not self.pool.grow(seq, self.pool.blocks_for(seq.num_tokens)):
                self._preempt(self.running[-1])

    def _preempt(self, seq: Sequence) -> None:
        """Preempt a running sequence: recorded first, so that one cut short (Ctrl-C) is completed (_settle)."""
        self._preempting = seq
        self._complete_preemption()

    def _complete_preemption(self) -> None:
        """The preemption of `_preempting`, each part repeatable: out of `running` and first in `waiting`; its K/V
        zeroed (on_preempt), its blocks and its slot (unless held back, its zeroing having raised) given back; its
        positions to run again from 0 (its drawn tokens, generator, penalties and detokenizer kept)."""
        seq = self._preempting
        if seq in self.running:
            self.running.remove(seq)
        if not self.waiting or self.waiting[0] is not seq:
            self.waiting.appendleft(seq)
        if seq.status is Status.RUNNING:
            free = self.on_preempt is None or self.on_preempt(seq)
            if self.pool is not None:
                self.pool.release(seq)
            if free and self._orphan(seq.slot):
                self.free_slots.append(seq.slot)
            seq.preempted += 1  # (counted twice where a Ctrl-C cuts in here: no slot or block is)
            self.preemptions += 1
            seq.status = Status.WAITING  # last: its slot is its own until here
        seq.num_cached, seq.slot = 0, -1
        self._preempting = None

    def written(self, seq: Sequence) -> None:
        """seq drew a token: its first num_cached positions' K/V are written (a numerical fault in them would have
        shown in the draw): cache its full blocks among them, of its prompt and of its outputs (prefix caching, as
        vLLM's: the next turn of a chat finds this one's answer, a preempted sequence its own blocks; the token just
        drawn has no K/V yet). A repeat does nothing more."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.pool.block_size
        if full > seq.registered:
            self.pool.register(seq, self._chain(seq, full)[seq.registered:full], start=seq.registered)
            seq.registered = full

    def _decodes(self, budget: int) -> list[Sequence]:
        """The running sequences due a decode, at most `budget` of them (in running order): over the budget, those
        that waited longest (then the longest running); the rest keep their slots and go first next time."""
        due = [seq for seq in self.running if seq.num_cached == seq.num_tokens - 1]
        if len(due) <= budget:
            return due
        picked = set(sorted(due, key=lambda seq: seq.scheduled_at)[:max(budget, 0)])  # stable: ties in running order
        return [seq for seq in due if seq in picked]

    def _settle(self) -> None:
        """Complete a preemption cut short (Ctrl-C), then an admission cut short after its sequence joined
        `running`: it is still first in `waiting` and its slot still last in `free_slots` (nowhere else can a
        running one be, or its slot)."""
        if self._preempting is not None:
            self._complete_preemption()
        if self.running:
            last = self.running[-1]
            if self.waiting and self.waiting[0] is last:
                self.waiting.popleft()
            if self.free_slots and self.free_slots[-1] == last.slot:
                self.free_slots.pop()

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark done and free its cache slot and blocks (for a waiting sequence, just drop it). Its status is set
        last: a finish cut short (Ctrl-C) is completed by finishing it again, as the engine's abort does, and its
        slot, until then, is neither free nor anyone's."""
        self._settle()
        if seq.finished:
            return
        held = seq in self.running
        if held:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if held or seq.status is Status.RUNNING and self._orphan(seq.slot):  # the latter: a finish cut short
            self.free_slots.append(seq.slot)
        if self.pool is not None:  # (none held: nothing; the engine's held slot took them, Endings.zero)
            self.pool.release(seq)
        seq.finish_reason = reason
        seq.status = Status.FINISHED

    def _orphan(self, slot: int) -> bool:
        """Whether slot is neither free nor held by a running sequence (lost unless returned)."""
        return slot not in self.free_slots and all(s.slot != slot for s in self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)
