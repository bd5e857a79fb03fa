"""Fused-MoE test cases shared by the torch-path and Triton-path kernel tests: inputs, sizes, tolerances, errors."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TOL_FP32 = 1e-4
TOL_FP16 = 5e-3
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
GRID = [(t, e, k) for t in (1, 3, 37, 130) for e in (1, 5, 8) for k in (1, 2, 3) if k <= e]
SPECIAL = {  # name -> (T, E, k, routing)
    "holes": (37, 8, 2, "holes"),
    "one_expert": (130, 5, 3, "one"),
    "skips": (37, 8, 3, "skip"),
    "all_skipped": (3, 5, 2, "none"),
    "many_experts": (9, 130, 3, "random"),
}


def make_inputs(tokens, experts, top_k, routing="random", dtype=torch.float32, hidden=40, inter=24, seed=0):
    """Random (hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    ids = torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k]  # distinct experts per token
    if routing == "holes":  # only experts 0, 2, 4, ... receive tokens
        ids = torch.rand(tokens, (experts + 1) // 2, generator=g).argsort(1)[:, :top_k] * 2
    elif routing == "one":  # every token on one expert, other slots skipped
        ids[:, 0] = experts // 2
        ids[:, 1:] = -1
    elif routing == "skip":
        ids[torch.rand(tokens, top_k, generator=g) < 0.3] = -1
        ids[-1] = -1
    elif routing == "none":
        ids[:] = -1
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (absolute error when ref is all zeros)."""
    diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _case_id(case) -> str:
    return "T{}-E{}-k{}".format(*case) if isinstance(case, tuple) else case


def _case_inputs(case, **kw):
    if isinstance(case, tuple):
        return make_inputs(*case, **kw)
    t, e, k, routing = SPECIAL[case]
    return make_inputs(t, e, k, routing, **kw)
