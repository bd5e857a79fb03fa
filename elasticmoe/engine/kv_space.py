"""The engine's KV cache sized from its limits, in blocks, checked against the device's free memory first."""

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


def check_fits(need: int, free: int, sizes: str) -> None:
    """Refuse (ValueError, naming the fields) a KV cache of `need` bytes where the device has `free`."""
    if need > free:
        raise ValueError(f"the KV cache ({sizes}) needs {need / GIB:.2f} GiB and the device has {free / GIB:.2f} "
                         f"GiB free; lower limits.kv_cache_tokens (or limits.max_num_seqs, limits.max_model_len)")


def make_cache(spec: ModelSpec, max_num_seqs: int, max_model_len: int, kv_cache_tokens: int | None, block_size: int,
               dtype: torch.dtype, device: torch.device) -> tuple[KVCache, BlockPool]:
    """The engine's KV cache and the pool of its blocks. On CUDA its bytes are compared with the free memory
    before anything is allocated (refused by name, not an out-of-memory error halfway)."""
    blocks = num_blocks(max_num_seqs, max_model_len, kv_cache_tokens, block_size)
    if device.type == "cuda":
        tokens = f"limits.kv_cache_tokens {kv_cache_tokens}" if kv_cache_tokens is not None else \
            f"limits.kv_cache_tokens unset: limits.max_num_seqs {max_num_seqs} x max_model_len {max_model_len}"
        per = KVCache.bytes_per_token(spec, dtype)
        check_fits(KVCache.nbytes(spec, dtype, max_num_seqs, blocks, block_size), torch.cuda.mem_get_info(device)[0],
                   f"{tokens} tokens, {blocks} blocks of limits.kv_block_size {block_size}, {per} bytes a token")
    cache = KVCache(spec, max_num_seqs, max_model_len, dtype, device, num_blocks=blocks, block_size=block_size)
    return cache, BlockPool(blocks, block_size)
