"""Mixture-of-attention heads (JetMoE): routed query / output projections over one shared set of keys and values."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.attention import Attention
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.kv_cache import KVCache
from elasticmoe.model.layers import Rotary
from elasticmoe.model.names import LayerNames
from elasticmoe.model.renames import MOA_NAMES

if TYPE_CHECKING:
    from elasticmoe.model.dense import DenseModel

F32 = torch.float32


class MoA(Attention):
    """One JetMoE attention layer. A router [E, H] picks k of E attention experts per token (top-k of its logits,
    softmax over those k); expert e's query projection q_experts[e] [hk * d, H] gives hk query heads, which attend
    the layer's one set of keys and values (kv_proj: hk heads, cached as any grouped-query layer's); its output
    projection o_experts[e] [H, hk * d] maps them back, weighted by the expert's router weight, and the k experts'
    outputs are summed, plus one output bias [H]. Weights by role: k, v, q_experts, o_experts, moa_router (float32),
    moa_offset."""

    def __init__(self, spec, layer: int, w: dict[str, torch.Tensor], eps: float):
        super().__init__(spec, layer, w, eps)
        a = self.spec
        self.top_k = a.num_heads // a.num_kv_heads  # experts per token

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> each token's experts ids [T, k] int64 and their weights [T, k] float32: a softmax over the k
        best router logits (the logits in float32)."""
        logits = linear(x.float(), self.w["moa_router"])  # [T, E]
        best, ids = logits.topk(self.top_k, dim=-1)  # [T, k] each
        return ids, best.softmax(dim=-1)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache, rotary: Rotary,
                cos: torch.Tensor, sin: torch.Tensor, masks: list[dict], picks: dict | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes this step's keys / values into the cache. Query head j * k + s (expert slot s,
        KV head j) reads KV head j, as the grouped-query attention's heads do."""
        a, t = self.spec, x.shape[0]
        cos, sin = cos[self.rope_set], sin[self.rope_set]
        ids, weights = self.route(x)  # [T, k]
        groups = self._groups(ids)
        q = self._experts_in(x, groups).view(t, self.top_k, a.num_kv_heads, a.head_dim)  # [T, k, hk, d]
        q = q.transpose(1, 2).reshape(t, a.num_heads, a.head_dim)  # head j * k + s: expert slot s, KV head j
        k = linear(x, self.w["k"]).view(t, a.num_kv_heads, a.head_dim)  # [T, hk, d]
        v = linear(x, self.w["v"]).view(t, a.num_kv_heads, a.v_head_dim)
        if self.rope:
            q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)  # float32; the cache rounds k
        kc, vc = cache.layers[self.layer]
        cache.write(kc, batch.write_index, k)
        cache.write(vc, batch.write_index, v)
        out = self.attend(q, x.dtype, batch, cache, masks)  # [T, hk * k, dv]
        out = out.view(t, a.num_kv_heads, self.top_k, a.v_head_dim).transpose(1, 2).reshape(t * self.top_k, -1)
        return self._experts_out(out, groups, weights.flatten(), t)  # [T, H]

    def _groups(self, ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """ids [T, k] -> (expert, its rows [n] of the flattened [T * k] choices) for each expert chosen; row r is
        token r // k's slot r % k."""
        flat = ids.flatten()  # [T * k]
        return [(e, (flat == e).nonzero().squeeze(1)) for e in flat.unique().tolist()]

    def _experts_in(self, x: torch.Tensor, groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Each token's query through each of its experts: x [T, H] -> [T * k, hk * d] in x's dtype."""
        wq = self.w["q_experts"]  # [E, hk * d, H]
        q = x.new_empty(x.shape[0] * self.top_k, wq.shape[1])
        for e, rows in groups:
            q[rows] = linear(x[rows // self.top_k], wq[e])
        return q

    def _experts_out(self, out: torch.Tensor, groups: list[tuple[int, torch.Tensor]], gates: torch.Tensor,
                     tokens: int) -> torch.Tensor:
        """The attention outputs out [T * k, hk * dv] each through its expert's output projection, times its router
        weight (gates [T * k]), summed over a token's k experts in float32, plus the output bias, rounded once:
        [T, H] in out's dtype."""
        wo = self.w["o_experts"]  # [E, H, hk * dv]
        acc = torch.zeros(tokens, wo.shape[1], dtype=F32, device=out.device)  # [T, H]
        for e, rows in groups:
            y = linear(out[rows], wo[e]).float() * gates[rows, None]  # [n, H]
            acc.index_add_(0, rows // self.top_k, y)
        return (acc + self.w["moa_offset"].float()).to(out.dtype)


def moa_shapes(a, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shapes config.json fixes for a MoA layer's weights, by role (a: the layer's AttentionSpec)."""
    width, e = a.num_kv_heads * a.head_dim, a.moa_experts
    return {"k": (width, hidden), "v": (a.num_kv_heads * a.v_head_dim, hidden), "q_experts": (e, width, hidden),
            "o_experts": (e, hidden, a.num_kv_heads * a.v_head_dim), "moa_router": (e, hidden), "moa_offset": (hidden,)}


def moa_layer(model: "DenseModel", i: int, names: LayerNames) -> MoA:
    """Layer i's mixture-of-attention heads from its self_attention.* weights (names.attn: role -> the views
    renames.jetmoe_views exposes), shapes checked; a missing one or one of another attention kind fails naming
    the stored tensor."""
    a = model.spec.attention.layer(i)
    shapes = moa_shapes(a, model.spec.hidden_size)
    prefix = f"{names.prefix}self_attention."
    for role in shapes:
        if role not in names.attn:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks {prefix}{MOA_NAMES[role][0]} (its "
                                  f"mixture-of-attention heads need it)")
    if other := sorted(n for r, n in names.attn.items() if r not in shapes):
        raise CheckpointError(f"{model.ckpt.path}: layer {i} holds {other[:2]}, which JetMoE's "
                              f"mixture-of-attention heads do not have")
    w = {r: model.load(n, F32 if r == "moa_router" else None, shapes[r]) for r, n in names.attn.items()}
    return MoA(model.spec.attention, i, w, model.spec.rms_norm_eps)
