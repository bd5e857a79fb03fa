"""Stateless building blocks of the dense half: RMSNorm, rotary embeddings, gated MLP, the router."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear

from elasticmoe.model.spec import ModelSpec, MoESpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor | float, eps: float, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """RMSNorm over the last dim in float32, weight applied in float32, one rounding to out_dtype (default x's).
    x [..., D] -> [..., D]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() if isinstance(weight, torch.Tensor) else weight
    return (w * xf).to(out_dtype or x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean-subtracted LayerNorm over the last dim, in float32 (Cohere-style when bias is None)."""
    xf = x.float()
    xf = xf - xf.mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight.float() * xf
    return (out if bias is None else out + bias.float()).to(out_dtype or x.dtype)


def norm(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The model's norm: "rms" or "layer". x [..., D] -> [..., D] in out_dtype (default x's)."""
    if kind == "rms":
        return rms_norm(x, weight, eps, out_dtype)
    return layer_norm(x, weight, bias, eps, out_dtype)


def act_fn(name: str):
    """A gate activation by the engine's name (family_config.act_name): "silu" or "gelu_tanh"."""
    return {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[name]


def gated_product(gate: torch.Tensor, up: torch.Tensor, act: str, limit: float = 0.0) -> torch.Tensor:
    """act(gate) * up, [n, I] each; a `limit` L > 0 clamps act(gate) to <= L and up to [-L, L] first (Step-3.7's
    SwiGLU clamps)."""
    gate = act_fn(act)(gate)
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate * up


def gated_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], act: str = "silu", limit: float = 0.0) -> torch.Tensor:
    """act(x @ gate.T + b) * (x @ up.T + b) @ down.T + b, from gate/up/down or a packed gate_up [2I, H]; act "silu"
    or "gelu_tanh". gate and up as the GEMM sums them (float32 on the CPU kernel), the activation and its product
    in float32, rounded once to x's dtype for down (transformers rounds gate, up, act(gate) and the product to it;
    Beam's MLP only gate and up). A `limit` L > 0 clamps act(gate) to <= L and up to [-L, L] (Step-3.7).
    x [T, H] -> [T, H]."""
    f32 = torch.float32
    if "gate_up" in w:
        gate, up = linear(x, w["gate_up"], w.get("gate_up_bias"), f32).chunk(2, dim=-1)  # [T, I] each
    else:
        gate, up = linear(x, w["gate"], w.get("gate_bias"), f32), linear(x, w["up"], w.get("up_bias"), f32)
    return linear(gated_product(gate, up, act, limit).to(x.dtype), w["down"], w.get("down_bias"))


class Rotary:
    """cos/sin tables for every position up to max_len, one per rotary table of the model (ModelSpec.rope_tables:
    one, or one per layer type), built once and kept in float32 (whatever the model's dtype: a rotated head is
    rounded once, where it is stored or attended, not after each product)."""

    def __init__(self, spec: ModelSpec, max_len: int, dtype: torch.dtype, device: torch.device):
        pos = torch.arange(max_len, dtype=torch.float32)
        self.cos, self.sin = [], []  # per table: [L, R] float32
        for inv_freq, scale in spec.rope_tables:
            freqs = pos[:, None] * inv_freq[None, :]  # [L, R/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [L, R]
            self.cos.append((emb.cos() * scale).to(device=device))
            self.sin.append((emb.sin() * scale).to(device=device))
        self.interleave = spec.attention.rope_interleave

    def tables(self, positions: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """positions [T] -> per table: cos, sin [T, 1, R] (broadcast over heads)."""
        return ([c[positions].unsqueeze(1) for c in self.cos], [s[positions].unsqueeze(1) for s in self.sin])

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool | None = None
              ) -> torch.Tensor:
        """Rotate the first R dims of every head (R: the table's width), in float32, pairwise or in halves
        (`interleave`, default the attention's layout). x [T, heads, D], cos / sin [T, 1, R] -> [T, heads, D]
        float32."""
        x = x.float()
        dim = cos.shape[-1]
        rot, rest = (x, None) if x.shape[-1] == dim else (x[..., :dim], x[..., dim:])
        # DeepSeek: pairs (x0, x1), (x2, x3)... rotated, emitted as [evens' ; odds']
        if self.interleave if interleave is None else interleave:
            half = dim // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return out if rest is None else torch.cat((out, rest), dim=-1)


def route(
    router_logits: torch.Tensor, moe: MoESpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top-k experts per token. router_logits [T, E] float32 -> topk_ids [T, k] int64, topk_weights [T, k] f32.

    optional soft-capping of the logits (Laguna); softmax or sigmoid scores; optional score-correction bias
    (affects the choice, not the weights); group-limited routing (keep the best `topk_group` of `n_group` groups);
    optional renormalisation (its denominator floored at moe.norm_min, plus moe.norm_add); the routed scaling factor.
    PhiMoE: sparsemixer.
    """
    if moe.router_softcap > 0:  # Laguna
        router_logits = torch.tanh(router_logits / moe.router_softcap) * moe.router_softcap
    if moe.scoring == "sparsemixer":
        return sparsemixer(router_logits, moe.jitter_eps)
    scores = router_logits.softmax(-1) if moe.scoring == "softmax" else router_logits.sigmoid()  # [T, E]
    choice = router_logits if moe.bias_on_logits else scores  # Kolibri: the bias joins the raw logits
    choice = choice if correction_bias is None else choice + correction_bias.float()
    if moe.n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, moe.n_group, e // moe.n_group)  # [T, G, E/G]
        if moe.group_score == "max":
            group_scores = grouped.amax(-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = group_scores.topk(moe.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(e // moe.n_group, dim=1), float("-inf"))
    topk_ids = choice.topk(moe.top_k, dim=-1, sorted=False).indices  # [T, k]
    topk_weights = scores.gather(1, topk_ids)
    if moe.norm_topk_prob:
        denom = topk_weights.sum(-1, keepdim=True)
        if moe.norm_min > 0:  # Ernie 4.5: a floor on the sum, which then shrinks the weights
            denom = denom.clamp(min=moe.norm_min)
        add = moe.norm_add if moe.norm_add is not None else (1e-20 if moe.scoring == "sigmoid" else 0.0)
        topk_weights = topk_weights / (denom + add if add else denom)
    if moe.routed_scaling_factor != 1.0:
        topk_weights = topk_weights * moe.routed_scaling_factor
    return topk_ids, topk_weights


def sparsemixer(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's routing at inference: the best expert, then the best of the others, each weighted by its share of a
    softmax over the experts whose logit lies within a relative 2 * eps of its own (no renormalisation).

    logits [T, E] float32 -> topk_ids [T, 2] int64, topk_weights [T, 2] float32.
    """
    ids, weights = [], []
    masked = logits
    for _ in range(2):
        best, idx = masked.max(dim=-1, keepdim=True)  # [T, 1]
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps  # [T, E]
        weights.append(masked.masked_fill(far, float("-inf")).softmax(-1).gather(-1, idx))
        ids.append(idx)
        masked = masked.scatter(-1, idx, float("-inf"))
    return torch.cat(ids, dim=-1), torch.cat(weights, dim=-1)
