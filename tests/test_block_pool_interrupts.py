"""Ctrl-C at every bytecode of the block pool's changes (reserve, release, transfer, register, uncache) and of the
scheduler's caching of written blocks: no block lost or held twice, and the cache's keys those of the tokens."""

from __future__ import annotations

import pytest

from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.prefix_cache import block_keys
from elasticmoe.engine.sampling import SamplingParams
from elasticmoe.engine.scheduler import Scheduler, Sequence
from tests.test_scheduler_interrupts import CODES, _interrupt_at

POOL_CODES = {f.__code__ for f in vars(BlockPool).values() if callable(f)}
KEYS = (b"k0", b"k1", b"k2")


def _pool(cached: bool) -> BlockPool:
    """8 blocks of 4: a holds 0-2, b 3-4, 5-7 free; `cached`: a's cached (its keys KEYS), b shares a's first two
    and holds 3, and c's two blocks (4, 5, keys x0 x1) are cached, held by no one."""
    pool = BlockPool(8, 4)
    assert pool.reserve("a", 3)
    if not cached:
        assert pool.reserve("b", 2)
        return pool
    pool.register("a", KEYS)
    assert pool.reserve("b", 3, KEYS[:2], query=9) and pool.blocks("b") == (0, 1, 3)
    assert pool.reserve("c", 2) and pool.blocks("c") == (4, 5)
    pool.register("c", (b"x0", b"x1"))
    pool.release("c")
    return pool


POOL_CASES = {  # name: (cached, the interrupted call, repeated after it as its callers do)
    "release": (False, lambda pool: pool.release("a")),
    "reserve": (False, lambda pool: pool.reserve("d", 3)),
    "transfer": (False, lambda pool: pool.transfer("a", ("held", 0))),
    "release shared": (True, lambda pool: pool.release("a")),
    "release the last holder": (True, lambda pool: (pool.release("b"), pool.release("a"))),
    "reserve evicting": (True, lambda pool: pool.reserve("d", 4)),
    "reserve sharing": (True, lambda pool: pool.reserve("e", 4, KEYS, query=12)),
    "transfer shared": (True, lambda pool: pool.transfer("b", ("held", 1))),
    "register": (True, lambda pool: pool.register("b", (b"y2",), start=2)),
    "uncache": (True, lambda pool: pool.uncache_written("a")),
}


@pytest.mark.parametrize("case", POOL_CASES)
def test_an_interrupt_anywhere_in_the_block_pool_loses_no_block(case):
    """Ctrl-C at each bytecode of a BlockPool change, then the call repeated (Scheduler.finish and its admission
    repeat theirs; Endings.zero_held its release): every block held by its owners, or free, and each once. A Ctrl-C
    in release between taking an owner's blocks and freeing them lost them for good."""
    cached, call = POOL_CASES[case]
    k = 0
    while True:
        k += 1
        pool = _pool(cached)
        cut = _interrupt_at(k, lambda: call(pool), POOL_CODES)
        call(pool)
        owners = [o for o in ("a", "b", "d", "e", ("held", 0), ("held", 1)) if pool.blocks(o)]
        held = {b for o in owners for b in pool.blocks(o)}
        assert pool.num_free + len(held) == 8, (case, k, pool.num_free, held)
        for b in held:
            assert pool.refs(b) == sum(b in pool.blocks(o) for o in owners), (case, k, b)
        for o in owners:
            pool.release(o)
        assert pool.num_free == 8 and pool.reserve("all", 8) and sorted(pool.blocks("all")) == list(range(8)), k
        if not cut:
            break
    assert k > 10, k


def test_an_interrupt_anywhere_in_caching_written_blocks_then_a_repeat_caches_them_once():
    """A sequence of 6 prompt and 7 output tokens, 12 positions written (its K/V), drawn from: written() cut short
    anywhere (in the scheduler or the pool), then repeated as the next draw does: its 3 full blocks, the last 2 of
    prompt and outputs, are cached under the hash chain of its tokens, once, and another prompt of those tokens
    finds them."""
    k = 0
    while True:
        k += 1
        sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(8, 4),
                          prefix_caching=True)
        seq = Sequence("a", list(range(10, 16)), SamplingParams(max_tokens=8))
        sched.add(seq)
        sched.schedule()
        seq.output_ids += list(range(20, 27))
        assert sched.pool.grow(seq, 4)
        seq.num_cached = 12
        cut = _interrupt_at(k, lambda: sched.written(seq), CODES | POOL_CODES)
        sched.written(seq)
        tokens = seq.prompt_ids + seq.output_ids
        assert seq.registered == 3 and seq.block_keys == block_keys(tokens, 4)[:3] and sched.pool.num_cached == 3, k
        assert sched.pool.reserve("b", 4, block_keys(tokens, 4)) and sched.pool.hits("b") == 3, k
        if not cut:
            break
    assert k > 20, k
