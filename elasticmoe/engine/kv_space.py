"""The engine's KV cache sized from its limits, in blocks, checked with the dense weights against free memory first."""

from __future__ import annotations

import torch

from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.model.kv_cache import KVCache
from elasticmoe.model.spec import ModelSpec

GIB = float(1 << 30)


def num_blocks(max_num_seqs: int, max_model_len: int, kv_cache_tokens: int | None, block_size: int) -> int:
    """Blocks of a cache of kv_cache_tokens positions (rounded up to whole blocks); None: max_num_seqs sequences of
    max_model_len, each in blocks of its own (the unpaged size: every slot can hold a whole context)."""
    for name, value in (("kv_block_size", block_size), ("kv_cache_tokens", kv_cache_tokens)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if kv_cache_tokens is None:
        return max_num_seqs * -(-max_model_len // block_size)
    return -(-kv_cache_tokens // block_size)


def check_fits(need: int, free: int, sizes: str, weights: int = 0) -> None:
    """Refuse (ValueError, naming the fields) a KV cache of `need` bytes beside dense weights of `weights` bytes
    (model.dense_bytes) where the device has `free`; weights alone over `free`: no limit helps, said so."""
    if weights > free:
        raise ValueError(f"the dense weights need {weights / GIB:.2f} GiB and the device has {free / GIB:.2f} GiB "
                         f"free, before any KV cache; serve the model on a device with more free memory (or set "
                         f"dtype to bfloat16 where it is float32)")
    if need + weights > free:
        raise ValueError(f"the KV cache ({sizes}) needs {need / GIB:.2f} GiB and the dense weights "
                         f"{weights / GIB:.2f} GiB, {(need + weights) / GIB:.2f} GiB in all, and the device has "
                         f"{free / GIB:.2f} GiB free; lower limits.kv_cache_tokens (or limits.max_num_seqs, "
                         f"limits.max_model_len)")


def make_cache(spec: ModelSpec, max_num_seqs: int, max_model_len: int, kv_cache_tokens: int | None, block_size: int,
               dtype: torch.dtype, device: torch.device, weights: int = 0) -> tuple[KVCache, BlockPool]:
    """The engine's KV cache and the pool of its blocks. On CUDA its bytes and `weights` (the dense weights' bytes,
    model.dense_bytes, loaded after it) are compared with the free memory before either is allocated (refused by
    name, not an out-of-memory error halfway)."""
    blocks = num_blocks(max_num_seqs, max_model_len, kv_cache_tokens, block_size)
    if device.type == "cuda":
        tokens = f"limits.kv_cache_tokens {kv_cache_tokens}" if kv_cache_tokens is not None else \
            f"limits.kv_cache_tokens unset: limits.max_num_seqs {max_num_seqs} x max_model_len {max_model_len}"
        per = KVCache.bytes_per_token(spec, dtype)
        check_fits(KVCache.nbytes(spec, dtype, max_num_seqs, blocks, block_size), torch.cuda.mem_get_info(device)[0],
                   f"{tokens} tokens, {blocks} blocks of limits.kv_block_size {block_size}, {per} bytes a token",
                   weights)
    cache = KVCache(spec, max_num_seqs, max_model_len, dtype, device, num_blocks=blocks, block_size=block_size)
    return cache, BlockPool(blocks, block_size)
