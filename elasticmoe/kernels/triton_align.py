"""Multi-program Triton block alignment: the same outputs as align.align_block_size_torch, bit for bit.

Three launches, each over many programs, ordered only by launch order (no barrier inside a program):
  count  grid C = cdiv(N, CHUNK): per-chunk expert histogram           -> counts [C, E_P2]
  scan   grid E_P2 / BLOCK_E:     exclusive prefix over chunks, per expert (in place) and totals [E_P2]
  place  grid C + fill programs:  pad_start = exclusive cumsum of padded totals (recomputed per program);
         chunk programs scatter pair p of expert e to pad_start[e] + counts[c, e] + (earlier same-expert
         pairs in the chunk), fill programs write expert_ids and the padding slots (disjoint from the scatter).
Pairs of one expert keep their pair order (a stable sort), so results never depend on scheduling.
Ids outside [0, E) (the -1 sentinel) are dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interp
from .align import check_align_args, max_num_blocks

interp.install()  # under TRITON_INTERPRET=1 only: device-function calls skip re-patching the language

CHUNK = 64  # pairs per count / scatter program: the [CHUNK, CHUNK] rank tile stays in registers
SCAN_ROWS = 64  # chunk rows per scan step
TILE_ELEMS = 4096  # [blocks, E_P2] budget of a fill program


@triton.jit(do_not_specialize=["num_pairs", "num_experts"])
def align_count_kernel(
    topk_ids_ptr, counts_ptr,  # topk_ids [N] int32/int64, counts [C, E_P2] int32 out
    num_pairs, num_experts,
    E_P2: tl.constexpr, CHUNK: tl.constexpr,
):
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    valid = (ids >= 0) & (ids < num_experts)
    hist = tl.histogram(tl.where(valid, ids, 0).to(tl.int32), E_P2, mask=valid)  # [E_P2]
    tl.store(counts_ptr + chunk.to(tl.int64) * E_P2 + tl.arange(0, E_P2), hist.to(tl.int32))


@triton.jit(do_not_specialize=["num_chunks"])
def align_scan_kernel(
    counts_ptr, totals_ptr,  # counts [C, E_P2] int32 in/out (-> exclusive prefix over chunks), totals [E_P2] out
    num_chunks,
    E_P2: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
):
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_chunks, ROWS):
        rows = start + tl.arange(0, ROWS)  # [R]
        ptrs = counts_ptr + rows[:, None].to(tl.int64) * E_P2 + experts[None, :]  # [R, BE]
        row_ok = rows[:, None] < num_chunks
        tile = tl.load(ptrs, mask=row_ok, other=0)
        tl.store(ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=row_ok)
        carry += tl.sum(tile, axis=0)
    tl.store(totals_ptr + experts, carry)


@triton.jit(do_not_specialize=["num_pairs", "num_experts", "num_chunks", "num_blocks"])
def align_place_kernel(
    topk_ids_ptr, offsets_ptr, totals_ptr,  # topk_ids [N], offsets [C, E_P2] (from scan), totals [E_P2]
    sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,  # [B * BLOCK_M], [B], [1] int32 out
    num_pairs, num_experts, num_chunks, num_blocks,
    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, FILL_BLOCKS: tl.constexpr,
):
    bins = tl.arange(0, E_P2)
    totals = tl.load(totals_ptr + bins)  # [E_P2]; bins >= E hold 0
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)  # [E_P2]
    pad_start = pad_end - padded
    pid = tl.program_id(0)
    if pid < num_chunks:  # scatter CHUNK pairs
        offs = pid * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        valid = (ids >= 0) & (ids < num_experts)
        expert = tl.where(valid, ids, 0).to(tl.int32)  # [CHUNK]
        lane = tl.arange(0, CHUNK)
        earlier = (expert[:, None] == expert[None, :]) & valid[None, :] & (lane[None, :] < lane[:, None])
        rank = tl.sum(earlier.to(tl.int32), axis=1)  # [CHUNK] same-expert pairs before this one in the chunk
        before = tl.load(offsets_ptr + pid.to(tl.int64) * E_P2 + expert)  # same-expert pairs in earlier chunks
        dest = tl.gather(pad_start, expert, 0) + before + rank
        tl.store(sorted_ids_ptr + dest, offs, mask=valid)
    else:  # expert_ids and padding slots of FILL_BLOCKS blocks
        total = tl.sum(padded, axis=0)
        blocks = (pid - num_chunks) * FILL_BLOCKS + tl.arange(0, FILL_BLOCKS)  # [FB]
        start = blocks * BLOCK_M
        done = pad_end[None, :] <= start[:, None]  # [FB, E_P2] experts wholly before the block
        owner = tl.sum(done.to(tl.int32), axis=1)  # [FB]
        owner_start = tl.sum(tl.where(done, padded[None, :], 0), axis=1)
        owner_count = tl.sum(tl.where(bins[None, :] == owner[:, None], totals[None, :], 0), axis=1)
        block_ok = blocks < num_blocks
        tl.store(expert_ids_ptr + blocks, tl.where(start < total, owner, -1), mask=block_ok)
        slots = start[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [FB, BM]
        pad = slots - owner_start[:, None] >= owner_count[:, None]
        tl.store(sorted_ids_ptr + slots, tl.zeros_like(slots) + num_pairs, mask=pad & block_ok[:, None])
        if pid == num_chunks:
            tl.store(num_post_padded_ptr, total)


def align_shapes(num_pairs: int, num_experts: int, block_m: int) -> dict:
    """Launch geometry (all derived from sizes on the host, nothing read from the device)."""
    e_p2 = max(triton.next_power_of_2(num_experts + 1), 16)
    num_blocks = max_num_blocks(num_pairs, num_experts, block_m)
    fill_blocks = max(2, min(TILE_ELEMS // e_p2, TILE_ELEMS // block_m))
    return dict(e_p2=e_p2, num_chunks=triton.cdiv(num_pairs, CHUNK), num_blocks=num_blocks,
                fill_blocks=fill_blocks, block_e=min(e_p2, 32))


def align_block_size_triton(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] or [N] -> (sorted_token_ids [B * BLOCK_M], expert_ids [B], num_tokens_post_padded [1])."""
    check_align_args(topk_ids, num_experts, block_m)
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two (a Triton tile), got {block_m}")
    flat = topk_ids.reshape(-1)  # [N]
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_pairs, device = flat.numel(), flat.device
    g = align_shapes(num_pairs, num_experts, block_m)
    counts = torch.empty(g["num_chunks"], g["e_p2"], dtype=torch.int32, device=device)  # [C, E_P2]
    totals = torch.empty(g["e_p2"], dtype=torch.int32, device=device)
    sorted_ids = torch.empty(g["num_blocks"] * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(g["num_blocks"], dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    align_count_kernel[(g["num_chunks"],)](flat, counts, num_pairs, num_experts,
                                           E_P2=g["e_p2"], CHUNK=CHUNK, num_warps=4)
    align_scan_kernel[(g["e_p2"] // g["block_e"],)](counts, totals, g["num_chunks"], E_P2=g["e_p2"],
                                                     BLOCK_E=g["block_e"], ROWS=SCAN_ROWS, num_warps=4)
    # at least one fill program: program num_chunks writes num_post, also when there are no pairs (N = 0)
    grid = (g["num_chunks"] + max(1, triton.cdiv(g["num_blocks"], g["fill_blocks"])),)
    align_place_kernel[grid](
        flat, counts, totals, sorted_ids, expert_ids, num_post,
        num_pairs, num_experts, g["num_chunks"], g["num_blocks"],
        BLOCK_M=block_m, E_P2=g["e_p2"], CHUNK=CHUNK, FILL_BLOCKS=g["fill_blocks"], num_warps=4,
    )
    return sorted_ids, expert_ids, num_post
