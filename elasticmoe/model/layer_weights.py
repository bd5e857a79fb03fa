"""One decoder layer's attention weights, shape-checked: GQA or MLA (with its indexer), Gated DeltaNet, short conv,
Mamba2, Mamba (v1), lightning attention."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elasticmoe.model.attention import Attention
from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.dense_roles import F32_ATTN, NORMED_ATTN, own_attn
from elasticmoe.model.deltanet import GatedDeltaNet, flat_projections
from elasticmoe.model.indexer import ROLES as INDEX_ROLES, index_shapes
from elasticmoe.model.kda import KimiDeltaAttention, kda_layer
from elasticmoe.model.kda_spec import KDASpec
from elasticmoe.model.lightning import Lightning, lightning_layer
from elasticmoe.model.lightning_spec import LightningSpec
from elasticmoe.model.linear_spec import LAYOUTS, LINEAR, Mamba2Spec, ShortConvSpec
from elasticmoe.model.mamba1 import Mamba1
from elasticmoe.model.mamba1_spec import Mamba1Spec
from elasticmoe.model.mamba2 import Mamba2
from elasticmoe.model.moa import moa_layer
from elasticmoe.model.names import ATTN, LayerNames
from elasticmoe.model.short_conv import ShortConv
from elasticmoe.model.spec import AttentionSpec

if TYPE_CHECKING:
    from elasticmoe.model.dense import DenseModel


def attention_shapes(a: AttentionSpec, hidden: int) -> dict[str, tuple[int, ...]]:
    """The shapes config.json fixes for the attention weights, by role (see names.ATTN); others are not checked."""
    q, o = a.num_heads * a.head_dim, (hidden, a.num_heads * a.v_head_dim)
    if a.kind == "mla":
        shapes = {"q": (q, hidden), "kv_a": (a.kv_lora_rank + a.rope_dim, hidden), "kv_a_norm": (a.kv_lora_rank,),
                  "kv_b": (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), "o": o}
        if a.q_lora_rank:
            shapes.update(q_a=(a.q_lora_rank, hidden), q_a_norm=(a.q_lora_rank,), q_b=(q, a.q_lora_rank))
        if a.indexer:
            shapes.update(index_shapes(a.indexer, hidden, a.q_lora_rank))
        return shapes
    k, v = a.num_kv_heads * a.head_dim, a.num_kv_heads * a.v_head_dim
    if a.output_gate:  # [q ; gate] per head
        q *= 2
    head = (a.head_dim,)  # per-head q/k norms (HunYuan's after the rotary too); OLMoE's span all heads
    gate = (a.num_heads if a.gate_per_head else a.num_heads * a.v_head_dim, hidden)
    return {"q": (q, hidden), "k": (k, hidden), "v": (v, hidden), "o": o, "gate": gate, "gate_offset": (a.num_heads,),
            "q_bias": (q,), "k_bias": (k,), "v_bias": (v,), "o_bias": (hidden,),
            "q_norm": (q,) if a.qk_norm_all_heads else head, "k_norm": (k,) if a.qk_norm_all_heads else head,
            "q_norm_rope": head, "k_norm_rope": head}


def attention_layer(model: "DenseModel", i: int, names: LayerNames) -> Attention:  # or its MoA subclass
    """Layer i's attention from its self_attn.* weights (names.attn: role -> tensor), shapes checked and every role
    its kind needs present."""
    a = model.spec.attention.layer(i)
    if a.moa_experts:  # JetMoE
        return moa_layer(model, i, names)
    shapes = attention_shapes(a, model.spec.hidden_size)
    attn = {role: model.load_norm(n, shapes.get(role)) if role in NORMED_ATTN
            else model.load(n, torch.float32 if role in F32_ATTN else None, shapes.get(role))
            for role, n in own_attn(model.spec, model.ckpt, i, names).items()}
    q = "q_a" if a.q_lora_rank else "q"
    need = (q, "kv_a", "kv_b", "o") if a.kind == "mla" else ("q", "k", "v", "o")
    if a.source(i) != i:  # KV sharing: queries only
        need = ("q", "o")
    elif a.v_from_k and a.v_from_k[i]:  # attention_k_eq_v: no v_proj
        need = ("q", "k", "o")
    need += ("sinks",) if a.sinks else ()  # per layer (MiMo-V2-Flash: sliding layers only)
    need += ("gate",) if a.gate_name != "gate_proj" else ()  # Laguna's g_proj
    need += INDEX_ROLES if a.indexer and a.indexer.own[i] else ()
    for role in need:
        if role not in attn:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks self_attn.{ATTN[role]}")
    if a.indexer and not a.indexer.own[i] and (extra := sorted(set(INDEX_ROLES) & set(attn))):
        raise CheckpointError(f"{model.ckpt.path}: layer {i} holds self_attn.{ATTN[extra[0]]}, but config.json "
                              "makes it share the previous layer's picks (indexer_types 'shared')")
    return Attention(model.spec.attention, i, attn, model.spec.rms_norm_eps)


def linear_layer(model: "DenseModel", i: int,
                 names: dict[str, str]) -> GatedDeltaNet | ShortConv | Mamba2 | Mamba1 | Lightning | KimiDeltaAttention:
    """Layer i's Gated DeltaNet from its linear_attn.* weights (names: role -> tensor), shapes checked; or its
    short convolution (LFM2's conv.*), its Mamba2 mixer (GraniteMoeHybrid's mamba.*), Mamba (v1) mixer (Jamba's),
    lightning attention (MiniMax) or Kimi Delta Attention (kda.kda_layer)."""
    sp, hidden = model.spec.linear, model.spec.hidden_size
    if isinstance(sp, ShortConvSpec):
        return short_conv_layer(model, i, names)
    if isinstance(sp, KDASpec):  # Kimi-Linear
        return kda_layer(model, i, names)
    if isinstance(sp, Mamba2Spec):
        return mamba2_layer(model, i, names)
    if isinstance(sp, Mamba1Spec):  # Jamba
        return mamba1_layer(model, i, names)
    if isinstance(sp, LightningSpec):  # MiniMax's self_attn.qkv_proj ... (lightning.lightning_layer)
        return lightning_layer(model, i, names)
    kd, vd, nv = sp.key_dim, sp.value_dim, sp.num_v_heads
    layout = next((roles for roles in LAYOUTS if all(r in names for r in roles)), LAYOUTS[0])
    shapes = {"qkvz": (2 * kd + 2 * vd, hidden), "ba": (2 * nv, hidden), "qkv": (2 * kd + vd, hidden),
              "z": (vd, hidden), "b": (nv, hidden), "a": (nv, hidden), "conv": (sp.conv_dim, 1, sp.conv_kernel),
              "dt_bias": (nv,), "A_log": (nv,), "norm": (sp.head_v_dim,), "out": (hidden, vd)}
    if both := sorted(names[r] for roles in LAYOUTS if roles != layout for r in roles if r in names):
        raise CheckpointError(f"{model.ckpt.path}: layer {i} holds both input-projection layouts of linear_attn "
                              f"(in_proj_qkvz / in_proj_ba or in_proj_qkv, _z, _b, _a): {both[:2]}")
    for role in (*layout, "conv", "dt_bias", "A_log", "norm", "out"):
        if role not in names:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks linear_attn.{LINEAR[role]}")
    w = {r: model.load(n, shape=shapes[r]) for r, n in names.items()}
    return GatedDeltaNet(sp, i, flat_projections(w, sp), model.spec.rms_norm_eps)


def short_conv_layer(model: "DenseModel", i: int, names: dict[str, str]) -> ShortConv:
    """Layer i's short convolution from its conv.* weights (names: role -> tensor), shapes checked."""
    sp, h = model.spec.linear, model.spec.hidden_size
    shapes = {"in": (3 * h, h), "in_bias": (3 * h,), "conv": (h, 1, sp.conv_kernel), "conv_bias": (h,),
              "out": (h, h), "out_bias": (h,)}
    for role, suffix in sp.weights.items():
        if role not in names:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks {suffix}")
    return ShortConv(sp, i, {r: model.load(n, shape=shapes[r]) for r, n in names.items()})


def mamba2_layer(model: "DenseModel", i: int, names: dict[str, str]) -> Mamba2:
    """Layer i's Mamba2 mixer from its weights (names: role -> tensor), shapes checked, every role present."""
    sp, h = model.spec.linear, model.spec.hidden_size
    proj, heads = 2 * sp.inner + 2 * sp.n_groups * sp.d_state + sp.num_heads, (sp.num_heads,)
    shapes = {"in": (proj, h), "in_bias": (proj,), "conv": (sp.conv_dim, 1, sp.conv_kernel),
              "conv_bias": (sp.conv_dim,), "dt_bias": heads, "A_log": heads, "D": heads, "norm": (sp.inner,),
              "out": (h, sp.inner), "out_bias": (h,)}
    for role, name in sp.weights.items():
        if role not in names:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks {name}")
    w = {r: model.load(n, torch.float32 if r in sp.f32_roles else None, shapes[r]) for r, n in names.items()}
    return Mamba2(sp, i, w, model.spec.rms_norm_eps)


def mamba1_layer(model: "DenseModel", i: int, names: dict[str, str]) -> Mamba1:
    """Layer i's Mamba (v1) mixer from its weights (names: role -> tensor), shapes checked, every role present."""
    sp = model.spec.linear
    shapes = sp.shapes(model.spec.hidden_size)
    for role, name in sp.weights.items():
        if role not in names:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks {name}")
    w = {r: model.load(n, torch.float32 if r in sp.f32_roles else None, shapes[r]) for r, n in names.items()}
    return Mamba1(sp, i, w, model.spec.rms_norm_eps)
