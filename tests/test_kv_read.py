"""KVCache.read (index_select over the flat rows) gives advanced indexing's rows bit for bit, at every cache tensor's
shape (GQA K/V, MLA latents, index keys) and dtype, for a decode group's [B, L] rows and a prefill chunk's [1, L]."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.model.kv_cache import KVCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("row", [(2, 16), (40,), (8,)], ids=["gqa", "mla", "index_keys"])
def test_read_is_advanced_indexing_bit_for_bit(dtype, row):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(33, 16, *row, generator=g).to(dtype)  # [blocks, block_size, ...]
    t[3, 5] = float("nan")  # a NaN row reads back as NaN, in place
    for shape in ((4, 37), (1, 300), (16, 1)):
        index = torch.randint(0, 33 * 16, shape, generator=g)  # [B, L] flat rows
        index[0, 0] = 3 * 16 + 5
        got = KVCache.read(t, index)
        want = t.view(-1, *row)[index]
        assert got.shape == (*shape, *row) and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32))
