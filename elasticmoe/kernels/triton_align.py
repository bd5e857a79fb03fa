"""Single-launch Triton block alignment (decode / small batches): same outputs as align.align_block_size_torch.

One program walks the N = T * k pairs in CHUNK-sized slices twice: pass 1 builds the per-expert
histogram (one-hot [CHUNK, E_P2] column sums), pass 2 scatters each pair to
pad_start[e] + (pairs of e seen in earlier chunks) + (exclusive cumsum of the one-hot inside the chunk),
which is exactly the stable order of a sort by expert. Serial over chunks, so it is meant for small N
(large N uses the torch-op version, also sync-free).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import max_num_blocks

ONE_HOT_ELEMS = 4096  # CHUNK * E_P2 budget: keeps the one-hot tile in registers


@triton.jit
def _align_kernel(
    topk_ids_ptr,  # [N] int32/int64
    sorted_ids_ptr,  # [B * BLOCK_M] int32, out
    expert_ids_ptr,  # [B] int32, out
    num_post_padded_ptr,  # [1] int32, out
    num_pairs,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    FILL: tl.constexpr,
):
    experts = tl.arange(0, E_P2)  # [E_P2]
    live = experts < num_experts
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & live[None, :]).to(tl.int32)  # [CHUNK, E_P2]
        counts += tl.sum(hit, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_P2]
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_post_padded_ptr, total)
    for start in range(0, num_blocks * BLOCK_M, FILL):
        offs = start + tl.arange(0, FILL)
        tl.store(sorted_ids_ptr + offs, tl.zeros([FILL], dtype=tl.int32) + num_pairs,
                 mask=offs < num_blocks * BLOCK_M)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + tl.arange(0, CHUNK)  # [CHUNK]
        owner = tl.sum((pad_end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        owner = tl.where(blocks * BLOCK_M < total, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=blocks < num_blocks)
    tl.debug_barrier()  # padding fill must land before the scatter below
    base = pad_start  # [E_P2] next free slot per expert
    for start in range(0, num_pairs, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & live[None, :]).to(tl.int32)  # [CHUNK, E_P2]
        before = tl.cumsum(hit, axis=0) - hit  # [CHUNK, E_P2] same-expert pairs earlier in chunk
        dest = tl.sum(hit * (before + base[None, :]), axis=1)  # [CHUNK]
        tl.store(sorted_ids_ptr + dest, offs, mask=tl.sum(hit, axis=1) > 0)
        base += tl.sum(hit, axis=0)


def align_block_size_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_token_ids [B * BLOCK_M], expert_ids [B], num_tokens_post_padded [1])."""
    flat = topk_ids.reshape(-1)  # [N]
    num_pairs = flat.numel()
    num_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=flat.device)
    num_post = torch.empty(1, dtype=torch.int32, device=flat.device)
    e_p2 = max(triton.next_power_of_2(num_experts), 16)
    chunk = max(16, min(256, ONE_HOT_ELEMS // e_p2))
    _align_kernel[(1,)](
        flat, sorted_ids, expert_ids, num_post, num_pairs, num_experts, num_blocks,
        BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, FILL=1024, num_warps=4,
    )
    return sorted_ids, expert_ids, num_post
