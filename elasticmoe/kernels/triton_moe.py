"""Host side of the Triton fused MoE: align on device, launch gate/up, down and top-k-sum kernels.

Pipeline (4 launches, no host sync; shapes for N = T * k pairs, B blocks of BLOCK_M slots):
  align      topk_ids [T, k] -> sorted_token_ids [B * BM], expert_ids [B], num_tokens_post_padded [1]
  gate_up    x [T, H] gathered by slot, x w13[e]^T, silu(gate) * up   -> act [B * BM, I] (sorted rows)
  down       act x w2[e]^T, times topk_weights                         -> pair_out [N, H] fp32
  topk_sum   sum over the k slots of each token (fp32, skips -1 slots) -> out [T, H] hidden's dtype
Writing pair_out and summing (instead of fp32 atomics into [T, H]) keeps the result deterministic,
needs no zero-fill launch and handles -1 slots, for an extra N * H * 4 bytes of traffic.
"""

from __future__ import annotations

import torch
import triton

from .align import align_block_size_torch, max_num_blocks
from .triton_align import align_block_size_triton
from .triton_gemm import down_kernel, gate_up_kernel, topk_sum_kernel
from .tuning import get_config

TRITON_ALIGN_MAX_PAIRS = 512  # single-program Triton alignment up to here, torch ops beyond
TRITON_ALIGN_MAX_EXPERTS = 1024
TOPK_SUM_TILE = 2048  # elements per top-k-sum program: BLOCK_T tokens x BLOCK_H columns


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


def fp32_tiles(config: dict) -> dict:
    """fp32 uses exact FMA dots (no tensor cores): cap the tiles so they fit in registers without spills."""
    caps = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_stages": 3}
    return {key: min(val, caps.get(key, val)) for key, val in config.items()}


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Dispatch to the single-launch Triton alignment (small N) or the torch-op one; see align.py."""
    if topk_ids.numel() <= TRITON_ALIGN_MAX_PAIRS and num_experts <= TRITON_ALIGN_MAX_EXPERTS:
        return align_block_size_triton(topk_ids, num_experts, block_m)
    return align_block_size_torch(topk_ids, num_experts, block_m)


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton MoE forward. hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k] -> [T, H].

    config: tile dict (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); default: tuned
    table lookup (tuning.get_config). Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    """
    if hidden.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton MoE backend needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    num_tokens, hidden_size = hidden.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    cfg = config or get_config(num_experts, inter, hidden_size, w13.dtype, num_tokens, hidden.device)
    if config is None and w13.dtype == torch.float32:
        cfg = fp32_tiles(cfg)
    x = hidden if hidden.dtype == w13.dtype else hidden.to(w13.dtype)  # [T, H]
    ids = topk_ids.reshape(-1).contiguous()  # [N]
    routing = align_block_size(ids, num_experts, cfg["BLOCK_M"])  # sorted_ids, expert_ids, num_post
    num_pid_m = max_num_blocks(ids.numel(), num_experts, cfg["BLOCK_M"])
    launch = dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION="ieee" if w13.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    act = _gate_up(x, w13, routing, topk_ids.shape[1], num_pid_m, launch)  # [B * BM, I]
    pair_out = _down(act, w2, topk_weights.reshape(-1).contiguous(), routing, ids.numel(), num_pid_m, launch)
    return _topk_sum(pair_out, ids, num_tokens, num_experts, hidden.dtype)  # [T, H]


def _gate_up(x, w13, routing, top_k, num_pid_m, launch) -> torch.Tensor:
    """act [B * BLOCK_M, I] = silu(gate) * up for every sorted slot (padding rows left unwritten)."""
    inter = w13.shape[1] // 2
    act = torch.empty(num_pid_m * launch["BLOCK_M"], inter, dtype=w13.dtype, device=x.device)
    grid = (num_pid_m * triton.cdiv(inter, launch["BLOCK_N"]),)
    gate_up_kernel[grid](
        x, w13, act, *routing,
        x.shape[0] * top_k, top_k, x.shape[1], inter, num_pid_m,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0), act.stride(1),
        **launch,
    )
    return act


def _down(act, w2, weights, routing, num_pairs, num_pid_m, launch) -> torch.Tensor:
    """pair_out [N, H] fp32 = topk_weight * (act @ w2[e]^T) per (token, slot) pair; -1 pairs unwritten."""
    hidden_size, inter = w2.shape[1], w2.shape[2]
    pair_out = torch.empty(num_pairs, hidden_size, dtype=torch.float32, device=act.device)
    grid = (num_pid_m * triton.cdiv(hidden_size, launch["BLOCK_N"]),)
    down_kernel[grid](
        act, w2, pair_out, weights, *routing,
        num_pairs, hidden_size, inter, num_pid_m,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), pair_out.stride(0),
        **launch,
    )
    return pair_out


def _topk_sum(pair_out, ids, num_tokens, num_experts, dtype) -> torch.Tensor:
    """out [T, H] (dtype) = fp32 sum of pair_out [T * k, H] over each token's valid slots."""
    hidden_size = pair_out.shape[1]
    out = torch.empty(num_tokens, hidden_size, dtype=dtype, device=pair_out.device)
    block_h = min(triton.next_power_of_2(hidden_size), 1024)
    block_t = max(2, min(TOPK_SUM_TILE // block_h, triton.next_power_of_2(num_tokens)))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden_size, block_h))
    topk_sum_kernel[grid](
        pair_out, ids, out, num_tokens, hidden_size, num_experts, out.stride(0),
        TOP_K=ids.numel() // num_tokens, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4,
    )
    return out
