"""Block alignment for the grouped GEMMs with torch ops only (no host sync): sort pairs by expert, pad to BLOCK_M.

Layout shared with the Triton kernel in triton_align.py (both give identical, stable results):
  sorted_token_ids [num_blocks * BLOCK_M] int32: pair index p = t * k + j, or N (= T * k) for padding;
      each expert's pairs are contiguous, in pair order, starting at a multiple of BLOCK_M.
  expert_ids [num_blocks] int32: the expert owning each BLOCK_M block, -1 past the padded total.
  num_tokens_post_padded [1] int32: the padded total (a multiple of BLOCK_M); later blocks are idle.
Slots whose id is outside [0, E) (the -1 sentinel) are dropped.
"""

from __future__ import annotations

import torch


def max_num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on BLOCK_M blocks: each of at most min(N, E) non-empty experts pads < BLOCK_M rows."""
    max_padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-max_padded // block_m)


def check_align_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """Raise ValueError naming the argument unless topk_ids holds integers, num_experts >= 0 and block_m >= 1."""
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must hold integer expert ids, got {topk_ids.dtype}")
    if int(num_experts) != num_experts or num_experts < 0:
        raise ValueError(f"num_experts must be an int >= 0, got {num_experts!r}")
    if int(block_m) != block_m or block_m < 1:
        raise ValueError(f"block_m must be an int >= 1, got {block_m!r}")


def align_block_size_torch(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_token_ids [B * BLOCK_M], expert_ids [B], num_tokens_post_padded [1]).

    Fixed-size outputs (B = max_num_blocks) so that nothing waits on the device.
    """
    check_align_args(topk_ids, num_experts, block_m)
    device = topk_ids.device
    key = topk_ids.reshape(-1).to(torch.int64).clamp(-1, num_experts).remainder_(num_experts + 1)  # [N]
    num_pairs = key.numel()
    num_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    order = torch.argsort(key, stable=True)  # [N]
    sorted_key = key[order]  # [N]
    bins = torch.arange(num_experts + 1, device=device)  # [E + 1]
    seg_start = torch.searchsorted(sorted_key, bins)  # [E + 1]
    counts = torch.searchsorted(sorted_key, bins, right=True) - seg_start  # [E + 1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    pad_end = padded.cumsum(0)  # [E]
    pad_start = torch.cat([pad_end - padded, pad_end.new_zeros(1)])  # [E + 1]
    rank = torch.arange(num_pairs, device=device) - seg_start[sorted_key]  # [N] rank within expert
    dump = num_blocks * block_m  # skipped pairs land in one extra slot, cut off below
    dest = torch.where(sorted_key < num_experts, pad_start[sorted_key] + rank, dump)  # [N]
    sorted_ids = torch.full((dump + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m  # [B]
    owner = torch.searchsorted(pad_end, block_start, right=True)  # [B]
    expert_ids = torch.where(owner < num_experts, owner, -1).to(torch.int32)  # [B]
    return sorted_ids[:dump], expert_ids, padded.sum().view(1).to(torch.int32)  # E = 0: pad_end is empty
