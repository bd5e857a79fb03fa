"""The scheduler's KV blocks on demand: a prompt's blocks at admission, one more at a block boundary, the newest
running sequence preempted (to the front of the queue) when too few are free, never to admit a newcomer."""

from __future__ import annotations

import pytest

from elasticmoe.engine import scheduler
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.sampling import SamplingParams
from elasticmoe.engine.scheduler import Scheduler, Sequence, Status

BLOCKS, BS = 6, 4


def _step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """One engine step as Engine._advance runs it: each sequence's tokens counted run; one whose last token ran
    draws one (token 100 + its index) after its full prompt blocks are cached (prefix caching)."""
    work = sched.schedule()
    for seq, n in work:
        seq.num_cached += n
        if seq.num_cached == seq.num_tokens:
            sched.written(seq)
            seq.output_ids.append(100 + len(seq.output_ids))
    return work


def _seq(name: str, prompt: int) -> Sequence:
    """A prompt of its own (none shares another's prefix: one would wait for the other's prefill, prefix caching)."""
    start = 10 + 100 * (sum(map(ord, name)) % 9)
    return Sequence(name, list(range(start, start + prompt)), SamplingParams(max_tokens=16))


def test_the_pool_grows_an_owner_keeping_its_blocks():
    """grow appends fresh blocks to those held (never released and taken again), all or nothing."""
    pool = BlockPool(4, BS)
    assert pool.reserve("a", 1) and pool.reserve("b", 2)
    first = pool.blocks("a")
    assert pool.grow("a", 1) and pool.blocks("a") == first  # holds enough: no change
    assert pool.grow("a", 2) and pool.blocks("a")[:1] == first and pool.num_free == 0
    assert not pool.grow("a", 3) and len(pool.blocks("a")) == 2  # none free: nothing taken
    pool.release("b")
    assert pool.grow("a", 4) and pool.blocks("a")[:1] == first and pool.num_free == 0


@pytest.mark.parametrize("caching", [False, True])
def test_blocks_on_demand_and_the_newest_preempted(caching, monkeypatch):
    """6 blocks of 4: a and b (prompts of 5: 2 blocks each, where a whole reservation of prompt + max_tokens would
    have taken 6) and c (a prompt of 1: 1 block) run together. At a's and b's 9th token (c's 5th) a takes the
    last free block, and b finds none: c, the newest, is preempted. At their 13th, b is, ahead of c in the queue:
    its blocks and slot given back, its positions to run again from 0 (prefix caching: from its cached blocks, of
    its prompt and its outputs, those a's 4th did not evict), its drawn tokens kept. Re-admitted once a ends, b and
    c are recomputed; all blocks come back. (Blocks to the last: no watermark, tested on its own below.)"""
    monkeypatch.setattr(scheduler, "WATERMARK", 0)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(BLOCKS, BS),
                      prefix_caching=caching)
    pool = sched.pool
    a, b, c = _seq("a", 5), _seq("b", 5), _seq("c", 1)
    for s in (a, b, c):
        sched.add(s)
    assert _step(sched) == [(a, 5), (b, 5), (c, 1)] and [len(pool.blocks(s)) for s in (a, b, c)] == [2, 2, 1]
    a_blocks = pool.blocks(a)
    for _ in range(3):  # a and b's tokens 7 to 9 are drawn (c's 3 to 5): blocks for the tokens run only
        _step(sched)
    assert a.num_tokens == 9 and [len(pool.blocks(s)) for s in (a, b, c)] == [2, 2, 1] and pool.num_free == 1
    _step(sched)  # the 9th runs: a grows (the last free block), then b finds none: c, the newest, is preempted
    assert pool.blocks(a)[:2] == a_blocks and len(pool.blocks(a)) == 3 and len(pool.blocks(b)) == 3
    assert sched.running == [a, b] and list(sched.waiting) == [c] and sched.preemptions == 1
    for _ in range(3):  # tokens 10 to 12: 3 blocks each
        _step(sched)
    drawn = list(b.output_ids)
    slot = b.slot
    _step(sched)  # a's 13th token needs a 4th block: b, the newest now, is preempted, ahead of c
    assert sched.running == [a] and list(sched.waiting) == [b, c] and sched.preemptions == 2
    assert (b.status, b.slot, b.num_cached, b.preempted, b.output_ids) == (Status.WAITING, -1, 0, 1, drawn)
    assert slot in sched.free_slots and len(pool.blocks(a)) == 4 and pool.blocks(b) == ()
    assert pool.num_free == 2  # b's 3 blocks (where cached, free but cached: its last evicted for a) less a's 4th
    sched.finish(a, "length")
    work = _step(sched)  # b first: all of its 13 tokens run again, less its cached blocks (prompt and outputs)
    hits = 2 * BS if caching else 0
    assert work[0] == (b, b.num_tokens - 1 - hits) and b.cached_tokens == 0 and b.output_ids == drawn + [108]
    assert pool.hits(b) == hits // BS
    assert work[1] == (c, 1 + 4) and sched.running == [b, c]
    assert pool.queried_tokens == (11 if caching else 0)  # looked up at first admissions only
    for s in (b, c):
        sched.finish(s, "length")
    assert pool.num_free == BLOCKS and sorted(sched.free_slots) == [0, 1, 2, 3] and not sched.has_work()


def test_no_preemption_to_admit_a_newcomer(monkeypatch):
    """The running sequences hold every block: a newcomer waits (however small) and no one is preempted for it;
    it is admitted once a running one ends (no watermark)."""
    monkeypatch.setattr(scheduler, "WATERMARK", 0)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(BLOCKS, BS))
    a, b = _seq("a", 9), _seq("b", 9)  # 3 blocks each: 6 until their 13th token
    sched.add(a)
    sched.add(b)
    _step(sched)
    new = _seq("new", 1)
    sched.add(new)
    for _ in range(3):
        _step(sched)
        assert sched.running == [a, b] and list(sched.waiting) == [new] and sched.pool.num_free == 0
    assert sched.preemptions == 0
    sched.finish(b, "stop")
    assert _step(sched) == [(a, 1), (new, 1)] and sched.preemptions == 0


def test_the_oldest_always_progresses():
    """Three sequences each of which needs most of the cache: the newer ones are preempted, one after another, so
    the oldest runs to its end, then the next, with every block back at the end; none is ever lost."""
    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(BLOCKS, BS))
    seqs = [_seq(f"r{i}", 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    ended: list[str] = []
    for _ in range(200):
        if not sched.has_work():
            break
        _step(sched)
        assert sum(len(sched.pool.blocks(s)) for s in sched.running) + sched.pool.num_free == BLOCKS
        assert len(sched.running) + len(sched.waiting) + len(ended) == 3
        for s in list(sched.running):
            if s.num_tokens == 4 + 18:  # 22 of 24 positions: each alone fits, two together do not
                sched.finish(s, "length")
                ended.append(s.request_id)
    assert ended == ["r0", "r1", "r2"] and sched.preemptions > 0
    assert sched.pool.num_free == BLOCKS and sorted(sched.free_slots) == [0, 1, 2]


def test_admission_beside_running_ones_leaves_the_watermark_free():
    """10 blocks of 4 (watermark: 1 block): beside a running (2 blocks), a prompt taking the 8 others waits (it used
    to be admitted, then preempted at a's next block boundary, its prefill wasted) and one of 7 is admitted; alone,
    a prompt of all 10 blocks is admitted."""
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(10, BS))
    a, b = _seq("a", 5), _seq("b", 32)
    sched.add(a)
    _step(sched)
    sched.add(b)
    assert _step(sched) == [(a, 1)] and b.status is Status.WAITING and sched.pool.num_free == 8
    sched.finish(b, "abort")
    c = _seq("c", 28)
    sched.add(c)
    assert _step(sched) == [(a, 1), (c, 28)] and sched.pool.num_free == 1
    lone = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(10, BS))
    d = _seq("d", 40)
    lone.add(d)
    assert _step(lone) == [(d, 40)] and lone.pool.num_free == 0


def test_the_watermark_blocks_no_admission_where_every_sequence_fits_whole():
    """10 blocks: a (prompt 4, max_tokens 4: 2 blocks at most, both held) and b (prompt 31, max_tokens 1: 8 blocks)
    fit whole, as in a cache of the default size (every sequence a whole context): b takes the last 8 blocks
    (the watermark alone kept one free, and b waited for a's end, with nothing ever to grow into)."""
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(10, BS))
    a = Sequence("a", list(range(10, 14)), SamplingParams(max_tokens=4))
    b = Sequence("b", list(range(10, 41)), SamplingParams(max_tokens=1))
    sched.add(a)
    _step(sched)
    sched.add(b)
    assert _step(sched) == [(a, 1), (b, 31)] and sched.pool.num_free == 0


def test_a_reservation_leaving_too_few_spare_changes_nothing():
    """reserve(spare=k) takes nothing unless k blocks stay free after it; a cached block it finds no one holds counts
    as taken from the free ones."""
    pool = BlockPool(4, BS)
    assert pool.reserve("a", 1, [b"k0"]) and (pool.register("a", [b"k0"]) or True)
    pool.release("a")  # k0's block cached, no one holds it: free
    assert not pool.reserve("b", 3, [b"k0"], spare=2) and pool.blocks("b") == () and pool.num_free == 4
    assert pool.reserve("b", 3, [b"k0"], spare=1) and pool.hits("b") == 1 and pool.num_free == 1
