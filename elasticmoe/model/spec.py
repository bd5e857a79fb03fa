"""One generic description of an MoE transformer, derived from a Hugging Face config (no per-model classes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from elasticmoe.model.family import Family
from elasticmoe.model.family_config import (  # noqa: F401  (ModelSpecError and the checks: re-exported)
    ModelSpecError, act_name, check_config_keys, check_model_type, config_get as _get, flat_dbrx, llama4_attention,
    longcat_mla_scales, longrope_context, mistral4_query_scale, mscale_rope, partial_rotary, per_layer_input,
)
from elasticmoe.model.lightning_spec import LightningSpec, residual_factors
from elasticmoe.model.linear_spec import LinearSpec, linear_from_config
from elasticmoe.model.layer_attention import (
    gate_fields, global_view, kv_sources, layer_dims, layer_heads, layer_ropes, layer_windows, moa_fields,
    per_layer_overrides, rope_tables, sliding_overrides, typed_rope, v_from_k,
)
from elasticmoe.model.indexer_spec import IndexerSpec, indexer_spec
from elasticmoe.model.moe_spec import MoESpec, moe_from_config  # noqa: F401  (MoESpec: re-exported)


@dataclass(frozen=True)
class AttentionSpec:
    """Attention of every layer: grouped-query (optionally q/k-normed, biased, windowed) or DeepSeek MLA."""

    kind: str  # "gqa" | "mla"
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim (gqa); qk_nope + qk_rope (mla)
    v_head_dim: int
    scaling: float  # softmax scale
    rope_dim: int  # rotated dims per head (partial rotary, or qk_rope_head_dim for MLA)
    rope_interleave: bool = False
    sliding_window: tuple[int | None, ...] = ()  # per layer, None = full attention
    rope_layers: tuple[bool, ...] = ()  # per layer: rotary applied (False = NoPE layer); empty = every layer
    qk_norm_after_rope: bool = False
    qk_norm_all_heads: bool = False  # q_norm / k_norm weights span all heads ([heads * head_dim]), else one head
    sinks: bool = False  # GPT-OSS: per-head sink logits join the softmax (self_attn.sinks)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    clip_qkv: float | None = None  # DBRX: q, k and v projections clamped to [-clip, clip]
    q_scale: float = 1.0  # LongCat MLA: multiplies the queries
    kv_scale: float = 1.0  # LongCat MLA: multiplies the normed kv latent
    chunk: tuple[int | None, ...] = ()  # per layer: chunked attention (keys in the query's chunk only), Llama 4
    l2_qk_norm: bool = False  # Llama 4: weightless RMS norm of q and k after the rotary, on rotary layers
    temperature: tuple[float, float] | None = None  # Llama 4 NoPE layers: (floor_scale, attn_scale)
    query_scale: tuple[float, float] | None = None  # Mistral 4 MLA: (original_max_position_embeddings, beta)
    output_gate: bool = False  # Qwen3-Next: q_proj gives [q ; gate] per head, the output times sigmoid(gate)
    layer_heads: tuple[int, ...] = ()  # per layer: query heads (Laguna); empty = num_heads in every layer
    rope_sets: tuple[int, ...] = ()  # per layer: its rotary table (ModelSpec.rope_tables, per layer type); empty = 0
    out_gate: str = "sigmoid"  # activation of the gate on the attention output (self_attn.<gate_name>)
    gate_name: str = "gate_proj"  # that gate's module: gate_proj (AFMoE), g_proj (Laguna)
    gate_per_head: bool = False  # that gate: one value per head (Laguna's default), else one per output feature
    nope_query_scale: tuple[float, float] | None = None  # Beam NoPE layers: q * (1 + (position + 1) / p) ** e
    indexer: IndexerSpec | None = None  # DeepSeek sparse attention: the keys each query attends to, picked
    layer_dims: tuple[tuple[int, int], ...] = ()  # per layer (head_dim, num_kv_heads) (Gemma 4); empty = the same
    kv_source: tuple[int, ...] = ()  # per layer: the layer whose cached keys / values it attends (KV sharing)
    v_from_k: tuple[bool, ...] = ()  # per layer: values are the key projection before its norm (no v_proj)
    v_norm: bool = False  # a weightless RMSNorm of each value head
    v_scale: float = 1.0  # multiplies the values before they are cached (attention_value_scale: MiMo-V2-Flash)
    sink_layers: tuple[bool, ...] = ()  # per layer: attention sinks (MiMo-V2-Flash: sliding layers); empty = `sinks`
    # mixture-of-attention heads (JetMoE, model.moa): this many attention experts, each a query and an output
    # projection of num_kv_heads heads; a router picks num_heads / num_kv_heads of them per token; 0: none
    moa_experts: int = 0

    def layer(self, i: int) -> "AttentionSpec":
        """Layer i's attention: its own query heads, head dim and KV heads where they differ per layer (the value
        head dim follows the q/k one unless it has its own: v_head_dim), and its sinks."""
        heads = self.layer_heads[i] if self.layer_heads else self.num_heads
        head_dim, kv_heads = self.layer_dims[i] if self.layer_dims else (self.head_dim, self.num_kv_heads)
        v_dim = head_dim if self.v_head_dim == self.head_dim else self.v_head_dim
        sinks = self.sink_layers[i] if self.sink_layers else self.sinks
        return replace(self, num_heads=heads, head_dim=head_dim, v_head_dim=v_dim, num_kv_heads=kv_heads, sinks=sinks)

    def source(self, i: int) -> int:
        """The layer whose cached keys and values layer i attends (itself unless it shares another's)."""
        return self.kv_source[i] if self.kv_source else i

    @property
    def cache_width(self) -> int:
        """Floats cached per token in one layer: latent kv + rope key for MLA, K and V heads for GQA."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.rope_dim
        return self.num_kv_heads * (self.head_dim + self.v_head_dim)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a checkpoint's architecture."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention: AttentionSpec
    moe: MoESpec
    rope_inv_freq: torch.Tensor = field(repr=False, compare=False)  # [rope_dim / 2]
    rope_scaling: float = 1.0  # multiplies cos/sin (attention_factor of YaRN-like ropes)
    # rotary tables 1.. of a per-layer-type rotary (AttentionSpec.rope_sets), each (inverse frequencies, scale)
    rope_more: tuple[tuple[torch.Tensor, float], ...] = field(default=(), repr=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dense_intermediate_size: int = 0
    block: str = "pre"  # "pre" | "post" | "sandwich" | "gemma" | "parallel" ... (see model.families.Family)
    norm: str = "rms"  # "rms" | "layer"
    embed_scale: float = 1.0  # multiplies the embeddings
    residual_scale: float = 1.0  # multiplies each sublayer's output before the residual add
    logits_scale: float = 1.0  # multiplies the LM-head output
    moe_out_norm: bool = False  # an RMSNorm on each MoE block's output (model.families.Family)
    depth_scaled: bool = False  # Beam: residual add k = h * sqrt((k - 1) / k) + out / sqrt(k) (model.families.Family)
    logit_softcap: float | None = None  # final_logit_softcapping: logits = cap * tanh(logits / cap)
    mtp_layers: int = 0  # multi-token-prediction layers stored after the last one (unused, as in transformers)
    biases: tuple[tuple[str, str, bool], ...] = (("attn", "attention_bias", True),)  # (part, config flag, its value)
    linear: LinearSpec | None = None  # per-slot-state layers (others attention)
    # MiniMax, per layer (attention alpha, beta, MLP alpha, beta): each residual add is alpha * the sublayer's
    # normed input + beta * its output (lightning_spec.residual_factors); empty: h + out
    residual_factors: tuple[tuple[float, float, float, float], ...] = ()
    norm_offset: float = 0.0  # added to every norm weight but a linear layer's gated one (zero-centred RMSNorms: 1)
    ignored: tuple[str, ...] = ()  # tensor-name patterns (re.match) transformers ignores on load
    tensor_names: tuple[tuple[str, str], ...] = ()  # (role, name): the family's own tensor names (families.Family)
    mlp_act: str = "silu"  # the dense MLPs' gate activation: "silu" | "gelu_tanh"
    embed_scale_rounded: bool = False  # embed_scale rounded to the model's dtype before it multiplies (Gemma)
    per_layer_input: int = 0  # per-layer input embeddings (PLE): their width per layer, 0 for none (model.extras)
    router_norm: bool = False  # the router reads the residual: weightless RMSNorm * router.scale / sqrt(H)
    moe_beside_mlp: bool = False  # a dense MLP beside the MoE in each layer, each with its own norms
    layer_scalar: bool = False  # each layer's output times its stored layer_scalar (model.extras)
    placeholder_ids: tuple[int, ...] = ()  # token ids embedded as pad_token_id (a multimodal model's placeholders)
    moe_bias: bool = False  # a bias added to each MoE block's output (JetMoE's mlp.bias, model.extras)
    layer_norm_eps: float | None = None  # the decoder layers' norm eps where not rms_norm_eps (the final norm's)

    @property
    def rope_tables(self) -> tuple[tuple[torch.Tensor, float], ...]:
        """Every rotary table: (inverse frequencies [dims / 2], cos/sin scale); layers pick theirs by rope_sets."""
        return ((self.rope_inv_freq, self.rope_scaling), *self.rope_more)

    def biases_dropped(self, part: str) -> str | None:
        """Why transformers builds the `part` ("attn", "mlp", "lm_head") projections without biases, dropping any
        stored (None: it builds them with biases)."""
        for p, flag, on in self.biases:
            if p == part:
                return None if on else f"config.{flag} is false"
        return f"model_type {self.model_type!r} has none there"


def _rope(cfg: Any, rope_dim: int, fam: Family) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin scale, by transformers' own rope initialisers (HunYuan's
    "dynamic" with an `alpha`: NTK-alpha, a base stretched by alpha ** (d / (d - 2)) at every length)."""
    params = dict(_get(cfg, "rope_parameters", "rope_scaling", default={}) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", _get(cfg, "rope_theta", default=10000.0))
    if theta is None:  # transformers fails on it with a bare TypeError
        raise ModelSpecError("config.rope_parameters.rope_theta is null: the rotary needs a base")
    bases = {float(t) for t in _get(cfg, "layer_rope_theta", default=()) if t}
    if bases - {float(theta)}:
        raise ModelSpecError(f"config.layer_rope_theta: rotary bases {sorted(bases)} other than "
                             f"rope_parameters.rope_theta are not supported")
    alpha = params.get("alpha") if fam.ntk_alpha and rope_type == "dynamic" else None
    if rope_type == "default" or alpha:
        base = theta * alpha ** (rope_dim / (rope_dim - 2)) if alpha else theta
        inv = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelSpecError(f"config.rope_parameters.rope_type={rope_type!r} is not supported")
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv.float(), float(scale)


def _required(cfg: Any, name: str) -> Any:
    """A field the math needs: null (or absent) fails naming it, not with a TypeError deep in the model's build."""
    value = getattr(cfg, name, None)
    if value is None:
        raise ModelSpecError(f"config.{name} is null: model_type {cfg.model_type!r} needs it")
    return value


def _with_head_dim(cfg: Any, attn: AttentionSpec) -> Any:
    """`cfg` with `head_dim: null` filled in as the attention derives it (hidden_size // num_attention_heads, as
    transformers' attention and default rope do): its other rope initialisers read the None and fail."""
    if attn.kind != "gqa" or getattr(cfg, "head_dim", 0) is not None:
        return cfg
    import copy

    filled = copy.copy(cfg)
    object.__setattr__(filled, "head_dim", attn.head_dim)
    return filled


def _pre_attn(cfg: Any, fam: Family, head_dim: int) -> float:
    """The softmax scale's square: query_pre_attn_scalar where the family reads it (Step-3.7), else head_dim."""
    value = _get(cfg, "query_pre_attn_scalar") if "query_pre_attn_scalar" in fam.keys else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ModelSpecError(f"config.query_pre_attn_scalar={value!r}: want a positive number")
    return head_dim if value is None else value


def _attention(cfg: Any, num_layers: int, fam: Family, sparse: tuple[bool, ...],
               overrides: dict[int, dict[str, Any]]) -> AttentionSpec:
    heads = cfg.num_attention_heads
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    windows = layer_windows(cfg, num_layers)
    if fam.window_required and _get(cfg, "sliding_window") is None:
        raise ModelSpecError(f"config.sliding_window is null: transformers' {cfg.model_type!r} builds a sliding-window "
                             "mask for every forward and fails without one")
    rope_layers = layer_ropes(cfg, fam, windows, sparse)
    if _get(cfg, "kv_lora_rank") is not None:
        if overrides or kv_sources(cfg, num_layers):
            raise ModelSpecError("config.per_layer_config / num_kv_shared_layers: per-layer shapes and KV sharing "
                                 "of MLA are not supported")
        nope, rope, v = (_required(cfg, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        scaling = (nope + rope) ** -0.5
        params = dict(_get(cfg, "rope_parameters", "rope_scaling", default={}) or {})
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if params.get("rope_type", "default") != "default" and mscale_all_dim:
            factor = params["factor"]
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0 if factor > 1 else 1.0
            scaling *= m * m
        if fam.default_rope_partial:  # its rotary turns all qk_rope_head_dim dims: a factor other than 1 is refused
            partial_rotary(cfg, fam)
        interleave = fam.rope_interleave
        if interleave is None:
            interleave = _get(cfg, "rope_interleave", default=True)
        return AttentionSpec(
            kind="mla", num_heads=heads, num_kv_heads=heads, head_dim=nope + rope, v_head_dim=v,
            scaling=scaling, rope_dim=rope, rope_interleave=bool(interleave), sliding_window=windows,
            rope_layers=rope_layers, q_lora_rank=_get(cfg, "q_lora_rank"), kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=nope, indexer=indexer_spec(cfg, fam, num_layers, rope),
            **(longcat_mla_scales(cfg) if cfg.model_type == "longcat_flash" else {}),
            **(mistral4_query_scale(cfg) if cfg.model_type == "mistral4" else {}),
        )
    if fam.indexer_rope is not None:
        raise ModelSpecError(f"model_type {cfg.model_type!r}: its sparse-attention indexer needs MLA (kv_lora_rank)")
    head_dim = _get(cfg, "head_dim", default=cfg.hidden_size // heads)
    rope_dim = int(head_dim * (1.0 if typed_rope(cfg) else partial_rotary(cfg, fam)))
    overrides, sink_layers = sliding_overrides(cfg, fam, overrides, num_layers, kv_heads)
    return AttentionSpec(
        kind="gqa", num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        v_head_dim=_get(cfg, "v_head_dim", default=head_dim), sink_layers=sink_layers, v_scale=float(_get(
            cfg, "attention_value_scale", default=1.0)),
        scaling=_get(cfg, "attention_multiplier", default=fam.attn_scale or _pre_attn(cfg, fam, head_dim) ** -0.5),
        layer_dims=layer_dims(overrides, num_layers, head_dim, kv_heads, heads), kv_source=kv_sources(cfg, num_layers),
        v_from_k=v_from_k(cfg, num_layers), v_norm=fam.v_norm,
        rope_dim=rope_dim, rope_interleave=bool(fam.rope_interleave), sliding_window=windows,
        rope_layers=rope_layers, qk_norm_after_rope=fam.qk_norm_after_rope, qk_norm_all_heads=fam.qk_norm_all_heads,
        sinks=bool(fam.attn_sinks), output_gate=fam.attn_output_gate, nope_query_scale=fam.nope_query_scale,
        clip_qkv=_get(cfg, "clip_qkv") if cfg.model_type == "dbrx" else None,
        layer_heads=layer_heads(cfg, num_layers, kv_heads, overrides), **gate_fields(cfg, fam.attn_gate),
        **(llama4_attention(cfg, num_layers) if cfg.model_type == "llama4_text" else {}),
    )


def spec_from_config(cfg: Any) -> ModelSpec:
    """Derive a ModelSpec from a transformers PretrainedConfig; raises ModelSpecError naming the field."""
    model_type = getattr(cfg, "model_type", None)
    fam = check_model_type(cfg, inner=True)  # files.py refuses an inner-only model alone
    overrides = per_layer_overrides(cfg, fam)  # per_layer_config: the layers whose attention shapes differ (Gemma 4)
    cfg = global_view(cfg)  # the global values of per-layer attributes
    if model_type == "dbrx":
        cfg = flat_dbrx(cfg)
    num_layers = cfg.num_hidden_layers
    moe = moe_from_config(cfg, num_layers, fam)
    moa = moa_fields(cfg, moe.num_experts) if fam.moa else {}  # JetMoE's mixture-of-attention heads
    attn = replace(_attention(cfg, num_layers, fam, moe.sparse_layers, overrides), **moa)
    if not any(moe.sparse_layers):
        raise ModelSpecError("config.json makes every layer dense (first_k_dense_replace / mlp_only_layers)")
    rope_more: tuple = ()
    if typed_rope(cfg) is not None:  # one rotary per layer type (Laguna, Mellum, Gemma 4; Beam's nulls: NoPE)
        if attn.kind != "gqa":
            raise ModelSpecError("config.rope_parameters per layer type: only with grouped-query attention")
        head_dims = tuple(attn.layer(i).head_dim for i in range(num_layers))
        tables, sets, rotates = rope_tables(cfg, head_dims, fam.partial_rotary, fam.nope_types, fam.rope_partial)
        (inv_freq, rope_scale), rope_more = tables[0], tuple(tables[1:])
        attn = replace(attn, rope_sets=sets, rope_dim=2 * len(tables[sets[0]][0]), rope_layers=rotates)
    else:
        inv_freq, rope_scale = _rope(_with_head_dim(cfg, attn), attn.rope_dim, fam)
    max_pos = _get(cfg, "max_position_embeddings", default=4096)
    if fam.rope_mscale:
        rope_scale, max_pos = mscale_rope(cfg, rope_scale, max_pos)
    max_pos = longrope_context(cfg, max_pos)
    eos = _get(cfg, "eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    embed_scale = float(_get(cfg, "embedding_multiplier", default=1.0))
    if _get(cfg, "mup_enabled", default=False) or fam.embed_sqrt:
        embed_scale = cfg.hidden_size**0.5
    logits_scale = float(_get(cfg, "logit_scale", default=1.0)) / float(_get(cfg, "logits_scaling", default=1.0))
    rms_set = model_type == "cohere2_moe" and _get(cfg, "rms_norm_eps") is not None  # its norms: RMSNorms then
    linear = linear_from_config(cfg, num_layers, fam)
    return ModelSpec(
        model_type=model_type, num_layers=num_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        rms_norm_eps=fam.norm_eps or float(_get(cfg, "rms_norm_eps", "layer_norm_eps", "norm_eps", default=1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        attention=attn, moe=moe, rope_inv_freq=inv_freq, rope_scaling=rope_scale, rope_more=rope_more,
        bos_token_id=_get(cfg, "bos_token_id"), eos_token_ids=eos_ids, pad_token_id=_get(cfg, "pad_token_id"),
        dense_intermediate_size=_get(cfg, "intermediate_size", default=0),
        block=fam.block, norm="rms" if rms_set else fam.norm, embed_scale=embed_scale, moe_out_norm=fam.moe_out_norm,
        residual_scale=float(_get(cfg, "residual_multiplier", default=1.0)), logits_scale=logits_scale,
        depth_scaled=fam.depth_scaled, logit_softcap=_softcap(cfg),
        mtp_layers=int(_get(cfg, "num_nextn_predict_layers", "num_mtp_layers", default=0)),
        biases=tuple((part, flag, bool(_get(cfg, flag, default=False))) for part, flag in fam.biases),
        linear=linear, norm_offset=1.0 if fam.centred_norms else 0.0,
        residual_factors=residual_factors(cfg, linear) if isinstance(linear, LightningSpec) else (),
        ignored=fam.ignored, tensor_names=fam.tensor_names, mlp_act=act_name(cfg),
        embed_scale_rounded=fam.embed_sqrt,
        per_layer_input=per_layer_input(cfg), router_norm=fam.router_norm, moe_beside_mlp=fam.moe_beside_mlp,
        layer_scalar=fam.layer_scalar, moe_bias=fam.moe_bias, layer_norm_eps=fam.layer_norm_eps,
    )


def _softcap(cfg: Any) -> float | None:
    """final_logit_softcapping (null: none); one that is not a positive number fails naming it."""
    cap = _get(cfg, "final_logit_softcapping")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf):
        raise ModelSpecError(f"config.final_logit_softcapping={cap!r}: want a finite positive number (null: none)")
    return None if cap is None else float(cap)
