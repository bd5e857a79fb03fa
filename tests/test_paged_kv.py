"""The paged KV cache: blocks through a block table, reserved at admission (no preemption), given back on every end;
outputs against transformers with blocks that cut chunks; the refusal of a request that can never fit."""

from __future__ import annotations

import pytest

from elasticmoe.engine.kv_blocks import BlockPool


def test_the_pool_reserves_all_or_nothing_and_gives_back():
    pool = BlockPool(6, 4)
    assert pool.blocks_for(1) == 1 and pool.blocks_for(8) == 2 and pool.blocks_for(9) == 3
    assert pool.reserve("a", 4) and pool.blocks("a") == (0, 1, 2, 3) and pool.num_free == 2
    assert not pool.reserve("b", 3) and pool.blocks("b") == () and pool.num_free == 2  # nothing taken
    assert pool.reserve("a", 4) and pool.num_free == 2  # again: the same blocks (an admission completed)
    assert pool.reserve("b", 2) and pool.num_free == 0
    pool.transfer("b", ("held", 1))
    assert pool.release("b") == () and pool.blocks(("held", 1)) == (4, 5)
    with pytest.raises(ValueError, match="held"):
        pool.transfer("a", ("held", 1))
    assert pool.release("a") == (0, 1, 2, 3) and pool.release("a") == () and pool.num_free == 4
    assert pool.reserve("c", 3) and pool.blocks("c") == (0, 1, 2)  # the blocks given back last, in order
    pool.release(("held", 1))
    pool.release("c")
    assert sorted(pool.blocks(o) for o in "abc") == [(), (), ()] and pool.num_free == 6
