"""Float64 per-token loop reference for the fused MoE contract (tests and benchmark checks only)."""

from __future__ import annotations

import torch

from .act import SILU, ExpertAct


def fused_moe_reference(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    act: ExpertAct | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Slow, obviously-correct MoE forward, computed in float64.

    hidden [T, H]; w13 [E, 2I, H] (rows :I gate, I: up); w2 [E, H, I];
    topk_ids [T, k] (-1 or any id outside [0, E) contributes nothing); topk_weights [T, k];
    act: the gated activation (default SiLU, act.py; input_scaled: the weight scales the input instead of the
    output); b13 [E, 2I], b2 [E, H]: biases (both or neither).
    Returns [T, H] in hidden's dtype.
    """
    act = act or SILU
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    x64 = hidden.double()  # [T, H]
    w13_64, w2_64 = w13.double(), w2.double()
    weights64 = topk_weights.double()  # [T, k]
    out = torch.zeros_like(x64)  # [T, H]
    ids = topk_ids.tolist()
    for t, row in enumerate(ids):
        for j, e in enumerate(row):
            if e < 0 or e >= num_experts:
                continue
            scale, weight = (weights64[t, j], 1.0) if act.input_scaled else (1.0, weights64[t, j])
            gate_up = (scale * x64[t]) @ w13_64[e].T + (0.0 if b13 is None else b13[e].double())  # [2I]
            y = act.apply(gate_up[:inter], gate_up[inter:]) @ w2_64[e].T  # [H]
            out[t] += weight * (y + (0.0 if b2 is None else b2[e].double()))  # [H]
    return out.to(hidden.dtype)
