"""DeepSeek sparse attention's indexer scoring (model/indexer.py): transformers' scores and top-k sets, read from the
paged cache as from a gathered copy, in blocks that never hold every key's per-head products or float32 keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from elasticmoe.model import indexer
from elasticmoe.model.indexer import pick, scores, top_keys
from elasticmoe.model.kv_cache import KVCache


def _transformers_scores(q, w, keys):
    """DeepseekV32Indexer's scoring, as transformers writes it: q [N, h, D], w [N, h], keys [N or 1, L, D] -> [N, L]."""
    s = F.relu(torch.matmul(q.float(), keys.float().transpose(-1, -2).unsqueeze(1)[:, 0]) * q.shape[-1] ** -0.5)
    return torch.matmul(w[:, None, :], s)[:, 0]  # [N, h, L] -> [N, L]


def _case(n, h, d, length, shared, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, w = torch.randn(n, h, d, generator=g), torch.randn(n, h, generator=g)  # [N, h, D], [N, h]
    keys = torch.randn(1 if shared else n, length, d, generator=g).to(dtype)  # [N or 1, L, D]
    valid = torch.rand(n, length, generator=g) > 0.25  # [N, L]
    return q, w, keys, valid


CASES = [  # (N, heads, head_dim, L, keys shared by every query, key dtype): decode groups, then prefill chunks
    (8, 64, 128, 5000, False, torch.float32),  # spans of 256 keys, the last one short
    (3, 4, 16, 1000, False, torch.bfloat16),
    (1, 64, 128, 700, False, torch.float16),
    (40, 64, 128, 900, True, torch.float32),  # rows in blocks of 8, one [span, D] x [D, rows h] product a span
    (300, 2, 8, 513, True, torch.bfloat16),
    (1, 4, 16, 600, True, torch.float32),
]


@pytest.mark.parametrize("n,h,d,length,shared,dtype", CASES)
def test_scores_and_picks_are_transformers(n, h, d, length, shared, dtype):
    q, w, keys, valid = _case(n, h, d, length, shared, dtype, seed=n + length)
    want = _transformers_scores(q, w, keys)  # [N, L]
    got = scores(q, w, keys)
    assert got.shape == (n, length) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    k = 100
    picked = top_keys(q, w, keys, valid, k)  # [N, k]
    ref = want.masked_fill(~valid, float("-inf")).topk(k, dim=-1).indices
    assert picked.shape == (n, k) and [set(r.tolist()) for r in picked] == [set(r.tolist()) for r in ref]
    keep = pick(q, w, keys, valid, k)  # [N, L]
    assert torch.equal(keep, torch.zeros_like(valid).scatter_(1, ref, True) & valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [False, True])
def test_paged_reads_pick_what_the_gathered_keys_pick(dtype, shared):
    """Keys read from a paged cache (blocks shuffled, index [N or 1, L]: DecodeGroup.read, prefill_reads) a span at
    a time score and pick exactly as the same keys gathered first (KVCache.read)."""
    n, h, d, length, block = 4, 16, 32, 1024, 16
    q, w, keys, valid = _case(n, h, d, length, shared, dtype, seed=7)
    rows = keys.shape[0]
    order = torch.randperm(rows * length // block, generator=torch.Generator().manual_seed(1))
    store = torch.empty(rows * length // block, block, d, dtype=dtype)  # [blocks, block_size, D]
    store[order] = keys.reshape(-1, block, d)
    index = (order.view(rows, -1, 1) * block + torch.arange(block)).view(rows, length)  # [N or 1, L]
    assert torch.equal(KVCache.read(store, index), keys)
    assert torch.equal(scores(q, w, store, index), scores(q, w, keys))
    assert torch.equal(top_keys(q, w, store, valid, 64, index), top_keys(q, w, keys, valid, 64))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_the_accelerators_larger_blocks_score_the_same(case, monkeypatch):
    """An accelerator scores in blocks of DEVICE_SCORE_BLOCK floats (one span of keys here, every row at once):
    the same scores and picks as the CPU's blocks."""
    n, h, d, length, shared, dtype = case
    q, w, keys, valid = _case(n, h, d, length, shared, dtype, seed=11)
    small, picked = scores(q, w, keys), top_keys(q, w, keys, valid, 100)
    monkeypatch.setattr(indexer, "SCORE_BLOCK", indexer.DEVICE_SCORE_BLOCK)
    assert (scores(q, w, keys) - small).abs().max() < 1e-5 * small.abs().max()
    assert [set(r.tolist()) for r in top_keys(q, w, keys, valid, 100)] == [set(r.tolist()) for r in picked]


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("paged", [False, True])
def test_a_long_context_is_scored_without_every_keys_products_or_float32_copy(paged):
    """A decode group of 8 rows at 16,384 keys, bf16 cache: no allocation holds more than a quarter of the keys in
    float32 (16 MiB), so neither the whole [N, h, L] per-head products (32 MiB; the scoring made them whole, then a
    scaled and a relu'd copy) nor all keys in float32 (64 MiB; made whole per step from the bf16 cache, after the
    paged read's own copy of every key)."""
    n, h, d, length = 8, 64, 128, 16384
    q, w, keys, valid = _case(n, h, d, length, False, torch.bfloat16, seed=3)
    store, index = keys.view(-1, 16, d), torch.arange(n * length).view(n, length)  # [blocks, 16, D], [N, L]
    run = (lambda: top_keys(q, w, store, valid, 2048, index)) if paged else (lambda: top_keys(q, w, keys, valid, 2048))
    keys_f32 = n * length * d * 4
    assert _largest_allocation(run) <= keys_f32 // 4
