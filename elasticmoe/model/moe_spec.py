"""The routed-expert half of a ModelSpec, derived from a Hugging Face config: router semantics, expert shapes and
which layers are MoE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from elasticmoe.model.family import Family
from elasticmoe.model.family_config import ModelSpecError, act_name, config_get as _get
from elasticmoe.model.mamba1_spec import jamba_sparse_layers


@dataclass(frozen=True)
class MoESpec:
    """The routed-expert half: router semantics and expert shapes."""

    num_experts: int
    top_k: int
    intermediate_size: int  # I of one routed expert
    scoring: str  # "softmax" | "sigmoid"
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int  # 1 = no group-limited routing
    topk_group: int
    group_score: str  # "top2_sum" (DeepSeek-V3) | "max" (DeepSeek-V2)
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP (False)
    hidden_act: str = "silu"
    shared_combine: str = "sum"  # routed + shared experts: "sum" | "average"
    expert_act: str = "silu"  # "silu" (gated SiLU) | "gelu_tanh" (gated tanh-GELU) | "swiglu_clamped" (GPT-OSS):
    #                           fused_moe's activation (expert_math.expert_act), on the torch and Triton backends
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    jitter_eps: float = 0.0  # sparsemixer: experts within this relative margin of the best share its softmax
    input_scaled: bool = False  # Llama 4: each expert runs on weight * x and its outputs are summed unweighted
    zero_experts: int = 0  # LongCat: router ids num_experts.. are identity experts (weight * x), run in place
    experts_in_out: bool = False  # packed experts stored [E, H, 2I] / [E, I, H] (Llama 4, Aria), square ones too
    norm_min: float = 0.0  # floor of the top-k renormalisation's denominator (Ernie 4.5's moe_norm_min)
    router_bias: bool = True  # a stored correction bias is read (LFM2's use_expert_bias false: transformers drops it)
    norm_add: float | None = None  # added to the top-k sum it divides by (None: 1e-20 for sigmoid, 0; LFM2: 1e-6)
    router_softcap: float = 0.0  # router logits soft-capped to cap * tanh(logits / cap) before scoring (0: none)
    bias_on_logits: bool = False  # the correction bias joins the raw logits, not the scores, for the choice
    # per layer: SwiGLU clamp L of the routed experts (swiglu_limits) and of the shared expert / dense MLP
    # (swiglu_limits_shared), silu(gate).clamp(max=L) * up.clamp(-L, L); 0 = none; () = none anywhere (Step-3.7)
    swiglu_limits: tuple[float, ...] = ()
    shared_limits: tuple[float, ...] = ()

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sparse_layers) if s]



def _sparse_layers(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    """Per layer: MoE or dense MLP, by whichever layer-placement fields the family's config has."""
    if cfg.model_type == "llama4_text":
        return tuple(i in set(cfg.moe_layers) for i in range(num_layers))
    if cfg.model_type == "jamba":  # every expert_layer_period-th layer from expert_layer_offset
        return jamba_sparse_layers(cfg, num_layers)
    if cfg.model_type == "longcat_flash":  # the first engine layer of each decoder layer holds the MoE
        return tuple(i % 2 == 0 for i in range(num_layers))
    types = _get(cfg, "mlp_layer_types")
    if types is not None:
        if len(types) != num_layers or set(types) - {"dense", "sparse"}:
            raise ModelSpecError(f"config.mlp_layer_types={types!r}: want {num_layers} of 'dense' / 'sparse'")
        return tuple(t == "sparse" for t in types)
    first_dense = _get(cfg, "first_k_dense_replace", "num_dense_layers", default=0)
    steps = ("decoder_sparse_step", "moe_layer_freq", "moe_layer_interval")
    step_key = next((k for k in steps if _get(cfg, k) is not None), None)
    step = _get(cfg, step_key) if step_key else 1
    if step < 1:  # transformers takes each layer index modulo the step: it fails to build the model
        raise ModelSpecError(f"config.{step_key}={step}: want 1 or more (every step-th layer is MoE)")
    start = _get(cfg, "moe_layer_start_index", default=0)
    end = _get(cfg, "moe_layer_end_index", default=num_layers - 1)
    only_mlp = set(_get(cfg, "mlp_only_layers", default=[]) or [])
    return tuple(i >= first_dense and start <= i <= end and (i + 1) % step == 0 and i not in only_mlp
                 for i in range(num_layers))


def _expert_counts(cfg: Any, model_type: str) -> tuple[int, int]:
    """The routed experts and the router's top-k."""
    num_experts = _get(cfg, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts", default=0)
    if not num_experts:
        raise ModelSpecError(
            f"config.json of model_type {model_type!r} has no experts "
            "(none of n_routed_experts / num_local_experts / num_experts): not a Mixture-of-Experts model"
        )
    top_k = _get(cfg, "num_experts_per_tok", "moe_topk", "top_k", "top_k_experts", default=None)
    if not top_k:
        raise ModelSpecError("config.json has no num_experts_per_tok (router top-k)")
    return num_experts, top_k


def _scoring(cfg: Any, model_type: str, fam: Family, top_k: int) -> tuple[str, bool]:
    """The router's scoring ("softmax", "sigmoid" or the family's own) and whether its top-k weights are
    renormalised."""
    scoring = _get(cfg, "expert_selection_fn", default=fam.scoring)
    if scoring not in ("softmax", "sigmoid", fam.scoring):
        raise ModelSpecError(f"config.expert_selection_fn={scoring!r}: only softmax and sigmoid routers are supported")
    if scoring == "sparsemixer" and top_k != 2:
        raise ModelSpecError(f"config.num_experts_per_tok={top_k}: PhiMoE's sparsemixer always routes to 2 experts")
    norm = fam.norm_topk if fam.norm_topk is not None else bool(_get(cfg, "norm_topk_prob", default=True))
    if model_type == "cohere2_moe" and scoring == "softmax":
        norm = True  # softmax over the top-k logits
    return scoring, norm


def _groups(cfg: Any, model_type: str) -> tuple[int, int, str, bool]:
    """Group-limited routing: (n_group, topk_group, group_score, grouped); n_group 1 and topk_group 1 when there is
    none."""
    n_group, group_score = _get(cfg, "n_group", default=1), "top2_sum"
    grouped = _get(cfg, "n_group") is not None  # transformers' router keeps the topk_group best of n_group groups
    if model_type == "longcat_flash":  # ... but LongCat's has no groups: it routes over every expert whatever they say
        n_group, grouped = 1, False
    if model_type == "deepseek_v2":
        group_score = "max"
        if _get(cfg, "topk_method", default="greedy") == "greedy":
            n_group, grouped = 1, False
    topk_group = _get(cfg, "topk_group", default=n_group) if grouped else 1
    return n_group, topk_group, group_score, grouped


def _check_expert_act(cfg: Any, model_type: str) -> str:
    """The experts' activation: gated SiLU or gated tanh-GELU MLPs (act_name), or GPT-OSS's clamped SwiGLU (MXFP4
    when quantised)."""
    if model_type != "gpt_oss":
        act = act_name(cfg)
        if act != "silu" and model_type == "llama4_text":  # its input-scaled experts are gated SiLU here
            raise ModelSpecError(f"config.hidden_act={cfg.hidden_act!r}: Llama 4's experts must be gated SiLU")
        return act
    quant = dict(_get(cfg, "quantization_config", default={}) or {})
    if quant and quant.get("quant_method") != "mxfp4":
        raise ModelSpecError(f"config.quantization_config.quant_method={quant.get('quant_method')!r}: "
                             "only MXFP4 GPT-OSS checkpoints are dequantised on load")
    return "swiglu_clamped"


def moe_from_config(cfg: Any, num_layers: int, fam: Family) -> MoESpec:
    """The routed-expert half of an HF config (`fam`: its family's router defaults); ModelSpecError names the first
    field it cannot serve."""
    model_type = cfg.model_type
    num_experts, top_k = _expert_counts(cfg, model_type)
    scoring, norm = _scoring(cfg, model_type, fam, top_k)
    n_group, topk_group, group_score, grouped = _groups(cfg, model_type)
    act = _check_expert_act(cfg, model_type)
    _check_routing(cfg, num_experts + int(_get(cfg, "zero_expert_num", default=0)), top_k, n_group, topk_group,
                   group_score, grouped)
    combine = _get(cfg, "shared_expert_combination_strategy", default="sum")
    if combine not in ("sum", "average"):
        raise ModelSpecError(f"config.shared_expert_combination_strategy={combine!r}: want 'sum' or 'average'")
    return MoESpec(
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=_get(cfg, "moe_intermediate_size", "intermediate_size"),
        scoring=scoring,
        norm_topk_prob=norm,
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", "route_scale", "router_scaling_factor",
                                         "moe_routed_scaling_factor", "moe_router_scaling_factor",
                                         default=1.0)),
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        sparse_layers=_sparse_layers(cfg, num_layers),
        hidden_act="silu",
        shared_combine=combine,
        expert_act=act,
        swiglu_alpha=float(_get(cfg, "swiglu_alpha", default=1.702)),
        swiglu_limit=float(_get(cfg, "swiglu_limit", default=7.0)),
        jitter_eps=float(_get(cfg, "router_jitter_noise", default=0.0)) if scoring == "sparsemixer" else 0.0,
        input_scaled=model_type == "llama4_text",
        zero_experts=int(_get(cfg, "zero_expert_num", default=0)),
        experts_in_out=fam.experts_in_out,
        norm_min=_norm_min(cfg) if model_type == "ernie4_5_moe" else 0.0,
        router_softcap=_softcap(cfg),
        bias_on_logits=fam.bias_on_logits,
        router_bias=bool(_get(cfg, "use_expert_bias", default=True)),
        norm_add=fam.topk_norm_add,
        swiglu_limits=_limits(cfg, "swiglu_limits", num_layers),
        shared_limits=_limits(cfg, "swiglu_limits_shared", num_layers),
    )


def _limits(cfg: Any, key: str, num_layers: int) -> tuple[float, ...]:
    """Per-layer SwiGLU clamps (Step-3.7): null / 0 entries clamp nothing; () where the config has none or all 0."""
    raw = _get(cfg, key)
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)) or len(raw) != num_layers:
        raise ModelSpecError(f"config.{key}={raw!r}: want a list of {num_layers} limits (0 or null: none)")
    out = []
    for i, v in enumerate(raw):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ModelSpecError(f"config.{key}[{i}]={v!r}: want 0 or null (no clamp) or a positive limit")
        out.append(float(v or 0.0))
    return tuple(out) if any(out) else ()


def _softcap(cfg: Any) -> float:
    """moe_router_logit_softcapping (Laguna): 0 (its default) for none, else a positive cap."""
    cap = _get(cfg, "moe_router_logit_softcapping", default=0.0)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
        raise ModelSpecError(f"config.moe_router_logit_softcapping={cap!r}: want 0 (none) or a positive cap")
    return float(cap)


def _norm_min(cfg: Any) -> float:
    """Ernie 4.5 divides its top-k weights by max(their sum, moe_norm_min) (transformers' default 1e-12)."""
    value = getattr(cfg, "moe_norm_min", 1e-12)  # None too: transformers' clamp then fails every forward
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelSpecError(f"config.moe_norm_min={value!r}: want a finite number (transformers' default 1e-12)")
    return float(value)


def _check_routing(cfg: Any, experts: int, top_k: int, n_group: int, topk_group: int, group_score: str,
                   grouped: bool) -> None:
    """A top-k the router can pick: at most the experts (of the groups kept, where transformers' router runs its
    group-limited routing: with one group too, where a topk_group of 0 masks every expert and more fail)."""
    field = next(n for n in ("num_experts_per_tok", "moe_topk", "top_k", "top_k_experts") if _get(cfg, n) is not None)
    if top_k < 1:  # transformers' top-k then fails every forward
        raise ModelSpecError(f"config.{field}={top_k}: want 1 or more experts per token")
    if n_group < 1:  # transformers splits the experts into n_group groups: it fails every forward
        raise ModelSpecError(f"config.n_group={n_group}: want 1 or more groups (1: no group-limited routing)")
    if top_k > experts:
        raise ModelSpecError(f"config.{field}={top_k}: more than the model's {experts} experts")
    if n_group <= 1 and not grouped:
        return
    per_group = experts // n_group
    if experts % n_group or (group_score == "top2_sum" and per_group < 2):
        top2 = " of 2 or more (groups are scored by their top 2)" if group_score == "top2_sum" else ""
        raise ModelSpecError(f"config.n_group={n_group} does not divide the {experts} experts into groups{top2}")
    if not 1 <= topk_group <= n_group:
        raise ModelSpecError(f"config.topk_group={topk_group}: want 1 to n_group ({n_group})")
    if top_k > topk_group * per_group:
        raise ModelSpecError(f"config.{field}={top_k}: more than the {topk_group * per_group} experts of the "
                             f"topk_group={topk_group} groups kept (of {per_group} experts each)")
