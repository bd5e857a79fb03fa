"""Layer parts beyond attention and MLP/MoE (Gemma 4): per-layer inputs, a normed router, layer scalars."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.layers import rms_norm

F32 = torch.float32
Find = Callable[..., "str | None"]  # the first of these names in the checkpoint (marked used), else None
Need = Callable[[str], str]  # this name, marked used; CheckpointError when absent

# the norms of a dense MLP beside the MoE (Family.moe_beside_mlp): role -> module under the layer
BESIDE_NORMS = {"moe_in": "pre_feedforward_layernorm_2", "moe_out": "post_feedforward_layernorm_2",
                "dense_out": "post_feedforward_layernorm_1"}


def model_extras(base: str, ple: bool, need: Need) -> dict[str, str]:
    """Model-wide extra tensors by role: PLE's table [V', L * P], projection [L * P, H] and its norm [P]."""
    if not ple:
        return {}
    return {"ple_embed": need(f"{base}embed_tokens_per_layer.weight"),
            "ple_model_proj": need(f"{base}per_layer_model_projection.weight"),
            "ple_proj_norm": need(f"{base}per_layer_projection_norm.weight")}


def layer_extras(prefix: str, block: str | None, spec, find: Find, need: Need) -> dict[str, str]:
    """One layer's extra tensors by role: layer_scalar, PLE's gate / projection / norm, the normed router's scale and
    per-expert scales."""
    out = {"layer_scalar": find(f"{prefix}layer_scalar") if spec.layer_scalar else None}  # absent: 1, as initialised
    if spec.per_layer_input:
        out.update(ple_gate=need(f"{prefix}per_layer_input_gate.weight"),
                   ple_proj=need(f"{prefix}per_layer_projection.weight"),
                   ple_norm=need(f"{prefix}post_per_layer_input_norm.weight"))
    if block is not None and spec.moe_bias:  # JetMoE: added to the MoE block's output
        out.update(moe_bias=need(f"{block}bias"))
    if block is not None and spec.router_norm:
        out.update(router_scale=need(f"{block}router.scale"), expert_scale=find(f"{block}router.per_expert_scale"))
    return {role: n for role, n in out.items() if n is not None}


def extra_shapes(spec) -> dict[str, tuple[int, ...]]:
    """The shapes config.json fixes for the extra tensors, by role."""
    h, p, e, n = spec.hidden_size, spec.per_layer_input, spec.moe.num_experts, spec.num_layers
    return {"layer_scalar": (1,), "ple_gate": (p, h), "ple_proj": (h, p), "ple_norm": (h,), "router_scale": (h,),
            "expert_scale": (e,), "ple_embed": (spec.vocab_size, n * p), "ple_model_proj": (n * p, h),
            "ple_proj_norm": (p,), "moe_bias": (h,)}


def ple_inputs(w: dict[str, torch.Tensor], token_ids: torch.Tensor, embeds: torch.Tensor, layers: int,
               eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Per-layer inputs of PLE: (norm(embeds @ proj.T / sqrt(H)) + table[ids] * sqrt(P)) / sqrt(2).
    token_ids [T], embeds [T, H] (scaled, model dtype) -> [T, L, P] in the model's dtype."""
    t, hidden = embeds.shape
    p = w["ple_proj_norm"].shape[0]
    proj = linear(embeds, w["ple_model_proj"]) * hidden**-0.5  # [T, L * P]
    proj = rms_norm(proj.view(t, layers, p), w["ple_proj_norm"], eps)  # [T, L, P]
    scale = torch.tensor(p**0.5, dtype=dtype)
    table = (w["ple_embed"][token_ids] * scale.to(w["ple_embed"].dtype)).view(t, layers, p)  # [T, L, P]
    return ((proj + table) * 2.0**-0.5).to(dtype)


def ple_add(h: torch.Tensor, w: dict[str, torch.Tensor], inputs: torch.Tensor, act, eps: float,
            dtype: torch.dtype) -> torch.Tensor:
    """h + norm(proj(act(gate(h)) * inputs)): one layer's PLE step. h [T, H] float32, inputs [T, P] -> [T, H]."""
    g = act(linear(h.to(dtype), w["ple_gate"])) * inputs  # [T, P]
    return h + rms_norm(linear(g, w["ple_proj"]), w["ple_norm"], eps, F32)


def normed_router_logits(h: torch.Tensor, router: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma 4's router: weightless RMSNorm of the residual, times scale / sqrt(H), projected.
    h [T, H] float32, router [E, H], scale [H] -> logits [T, E] float32."""
    x = rms_norm(h, 1.0, eps, F32) * scale.float() * h.shape[-1] ** -0.5
    return F.linear(x, router.float())
