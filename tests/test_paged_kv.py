"""The paged KV cache: blocks through a block table, reserved at admission (no preemption), given back on every end;
outputs against transformers with blocks that cut chunks; the refusal of a request that can never fit."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.model.batch import build_batch
from elasticmoe.model.block_table import BlockTable
from tests.test_step_host_copies import count_host_tensors

CPU = torch.device("cpu")


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


def test_positions_go_through_the_block_table_in_the_steps_one_copy(monkeypatch):
    """A slot's blocks need not be contiguous: position p is row blocks[p // bs] * bs + p % bs, for the writes
    [T] and for the reads of a prefill chunk [1, L] and of a decode group [B, L] (the shorter row's positions past
    its blocks: the null block's rows, kept zero). The rows assigned since the last step go in its one copy."""
    table = BlockTable(num_slots=3, max_blocks=4, block_size=3, null=8, device=CPU)
    table.assign(1, (7, 2, 5))
    table.assign(2, (0,))
    made = count_host_tensors(monkeypatch)
    batch = build_batch([(1, 2, [11, 12, 13, 14, 15]), (2, 1, [16])], CPU, table)
    monkeypatch.undo()
    assert made == ["frombuffer"] and table.pending == {}
    assert batch.write_index.tolist() == [23, 6, 7, 8, 15, 1]
    assert batch.prefill_reads[0].tolist() == [[21, 22, 23, 6, 7, 8, 15]]
    assert table.tensor[1].tolist() == [7, 2, 5, 8] and table.tensor[2].tolist() == [0, 8, 8, 8]
    decode = build_batch([(1, 6, [17]), (2, 2, [18])], CPU, table)
    (group,) = decode.decode_groups
    assert group.slots.tolist() == [2, 1] and group.read.tolist() == [[0, 1, 2, 24, 25, 26, 24],
                                                                          [21, 22, 23, 6, 7, 8, 15]]
    with pytest.raises(ValueError, match="slot 2: positions up to 4 past the 3 its blocks hold"):
        build_batch([(2, 3, [19])], CPU, table)
