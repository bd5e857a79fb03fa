"""Reading a config.json per family: the keys checked, the types rejected, fields that only some families have."""

from __future__ import annotations

from typing import Any

from elasticmoe.model.families import COMMON_KEYS, FAMILIES, HARMLESS_KEYS, REJECTED, Family


class ModelSpecError(ValueError):
    """The checkpoint's config describes a model elasticmoe cannot run (names the field)."""


def config_get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that the config sets (not None), else `default`."""
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def mscale_rope(cfg: Any, scale: float, max_pos: int) -> tuple[float, int]:
    """PhiMoE's cos/sin scale and context limit. Its non-default rotary scales cos/sin by short_mscale while the
    sequence fits in original_max_position_embeddings; past that transformers switches to long_mscale and recomputes
    the whole KV cache, which a cache cannot follow: the context is capped there instead."""
    params = dict(config_get(cfg, "rope_parameters", default={}) or {})
    if params.get("rope_type", "default") == "default":
        return scale, max_pos
    missing = [k for k in ("short_mscale", "original_max_position_embeddings") if k not in params]
    if missing:
        raise ModelSpecError(f"config.rope_parameters lacks {missing} (PhiMoE's rotary needs them)")
    return float(params["short_mscale"]), min(max_pos, int(params["original_max_position_embeddings"]))


def longrope_context(cfg: Any, max_pos: int) -> int:
    """The context limit under LongRoPE: past rope_parameters.original_max_position_embeddings transformers rotates
    every position with the long factors instead of the short ones (the whole cache recomputed, which a cache cannot
    follow), so the context is capped there."""
    params = dict(config_get(cfg, "rope_parameters", "rope_scaling", default={}) or {})
    original = params.get("original_max_position_embeddings")
    if params.get("rope_type", params.get("type")) != "longrope" or not original:
        return max_pos
    return min(max_pos, int(original))


def partial_rotary(cfg: Any, fam: Family) -> float:
    """The share of each head's dims the rotary turns. Most families' rotary turns them all whatever
    partial_rotary_factor says (their default rope ignores it); under another rope type transformers' initialisers
    shorten cos/sin to it, which such a family's rotary then cannot apply: refused (so is any rope type of a family
    whose default rope shortens them too, Family.default_rope_partial)."""
    params = dict(config_get(cfg, "rope_parameters", default={}) or {})
    partial = params.get("partial_rotary_factor", config_get(cfg, "partial_rotary_factor", default=None)) or 1.0
    if fam.partial_rotary or partial == 1.0:
        return partial
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or fam.default_rope_partial:
        raise ModelSpecError(f"config.partial_rotary_factor={partial}: model_type {cfg.model_type!r} rotates every "
                             f"head dim, and with rope_type {rope_type!r} transformers fails every forward")
    return 1.0


def llama4_attention(cfg: Any, num_layers: int) -> dict[str, Any]:
    """Llama 4's chunked attention on its "chunked_attention" layers, L2 q/k norms and NoPE temperature tuning."""
    types = config_get(cfg, "layer_types") or ["full_attention"] * num_layers
    size = config_get(cfg, "attention_chunk_size")
    chunk = tuple(size if t == "chunked_attention" and size else None for t in types)
    tuning = config_get(cfg, "attn_temperature_tuning")
    temperature = (float(cfg.floor_scale), float(cfg.attn_scale)) if tuning else None
    return dict(chunk=chunk, l2_qk_norm=bool(config_get(cfg, "use_qk_norm", default=False)), temperature=temperature)


def longcat_mla_scales(cfg: Any) -> dict[str, float]:
    """LongCat-Flash's MLA multiplies the queries by sqrt(H / q_lora_rank) and the normed kv latent by
    sqrt(H / kv_lora_rank)."""
    hidden = cfg.hidden_size
    return dict(q_scale=(hidden / cfg.q_lora_rank) ** 0.5, kv_scale=(hidden / cfg.kv_lora_rank) ** 0.5)


def mistral4_query_scale(cfg: Any) -> dict[str, tuple[float, float]]:
    """Mistral 4 scales its MLA queries by 1 + beta * log(1 + floor(position / original_max_position_embeddings)),
    both read from rope_parameters (llama_4_scaling_beta)."""
    params = dict(config_get(cfg, "rope_parameters", default={}) or {})
    beta, period = params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings")
    if beta is None or not period:
        raise ModelSpecError("config.rope_parameters needs llama_4_scaling_beta and original_max_position_embeddings "
                             "(Mistral 4 scales its queries by them)")
    return dict(query_scale=(float(period), float(beta)))


def check_config_keys(raw: dict[str, Any], model_type: str) -> None:
    """Reject a config.json key that may change the math and that this family's spec does not read."""
    fam = FAMILIES[model_type]
    known = HARMLESS_KEYS | COMMON_KEYS | set(fam.keys)
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise ModelSpecError(
            f"config key(s) {unknown} of model_type {model_type!r} are not understood by elasticmoe "
            "and may change the math; remove them if they do not")
    for sub, keys in fam.nested:
        inner = raw.get(sub) or {}
        unknown = sorted(k for k in inner if k not in HARMLESS_KEYS and k not in keys)
        if unknown:
            raise ModelSpecError(f"config key(s) {[f'{sub}.{k}' for k in unknown]} of model_type {model_type!r} are "
                                 "not understood by elasticmoe and may change the math; remove them if they do not")
    for key, value in fam.neutral:
        if key in raw and raw[key] != value:
            raise ModelSpecError(f"config.{key}={raw[key]!r} is not supported for model_type {model_type!r} "
                                 f"(only {value!r})")


def mentions_experts(d: Any) -> bool:
    """Whether a config dict (nested text/ffn configs included) has any expert field."""
    if not isinstance(d, dict):
        return False
    return any("expert" in str(k) or "moe" in str(k) or mentions_experts(v) for k, v in d.items())


def check_model_type(cfg: Any, inner: bool = False) -> Family:
    """The family of `cfg.model_type`; a rejected or unverified family raises ModelSpecError naming what it lacks, and
    so does a multimodal family's language model (Family.inner_only) unless `inner` (read as that family's)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type in REJECTED:
        raise ModelSpecError(f"model_type {model_type!r} is not supported: {REJECTED[model_type]}")
    if model_type not in FAMILIES and not mentions_experts(cfg.to_dict()):
        raise ModelSpecError(f"config.json of model_type {model_type!r} has no experts: not a Mixture-of-Experts model")
    if model_type not in FAMILIES:
        raise ModelSpecError(f"model_type {model_type!r} is not a verified family (its modeling code was not "
                             f"checked against transformers); verified: {', '.join(sorted(FAMILIES))}")
    fam = FAMILIES[model_type]
    if fam.inner_only and not inner:
        outer = sorted(k for k, f in FAMILIES.items() if f.text_model == model_type)
        raise ModelSpecError(f"model_type {model_type!r} is not supported alone: transformers has no causal LM of it, "
                             f"only the language model inside {', '.join(map(repr, outer))}")
    return fam


def language_model(cfg: Any, raw: dict[str, Any], fam: Family) -> tuple[Any, dict[str, Any]]:
    """A multimodal config's language model (config.text_config) and its config.json dict, for a family run on text
    alone (Family.text_model); its other encoders' weights are left to the text family's `ignored` patterns."""
    text = getattr(cfg, "text_config", None)
    if getattr(text, "model_type", None) != fam.text_model:
        raise ModelSpecError(f"config.text_config.model_type={getattr(text, 'model_type', None)!r}: model_type "
                             f"{cfg.model_type!r} runs a {fam.text_model!r} language model")
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    if fam.top_ties_head and tie != bool(getattr(text, "tie_word_embeddings", False)):
        import copy  # the multimodal model's LM head, tied or not by its own config (the text config's flag unread)

        text = copy.copy(text)
        object.__setattr__(text, "tie_word_embeddings", tie)
    elif tie != bool(getattr(text, "tie_word_embeddings", False)):
        raise ModelSpecError("config.tie_word_embeddings differs from config.text_config.tie_word_embeddings: which "
                             "one ties the LM head is not settled")
    text_raw = {k: v for k, v in dict(raw.get("text_config") or {}).items() if (k, v) not in fam.text_inert}
    return text, text_raw


def placeholder_ids(cfg: Any, text: Any, fam: Family) -> tuple[int, ...]:
    """The multimodal config's placeholder token ids (Family.placeholders) that transformers embeds as
    text_config.pad_token_id on text; with none of those set: ()."""
    ids = tuple(sorted({int(v) for k in fam.placeholders if (v := getattr(cfg, k, None)) is not None}))
    if ids and getattr(text, "pad_token_id", None) is None:
        raise ModelSpecError(f"config.text_config.pad_token_id is null: model_type {cfg.model_type!r} embeds its "
                             f"placeholder tokens {list(ids)} as the pad token")
    return ids


def flat_dbrx(cfg: Any) -> Any:
    """DBRX's nested attn_config / ffn_config as the flat fields the spec reads (a copy of the config)."""
    import copy

    attn, ffn = cfg.attn_config, cfg.ffn_config
    act = dict(ffn.ffn_act_fn or {"name": "silu"})
    if act != {"name": "silu"}:
        raise ModelSpecError(f"config.ffn_config.ffn_act_fn={act!r}: DBRX experts must be gated SiLU")
    p = ffn.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise ModelSpecError(f"config.ffn_config.moe_normalize_expert_weights={p!r}: only the L1 norm (1.0) or "
                             "none (null) of the top-k weights is supported")
    flat = copy.copy(cfg)
    for key, value in (("num_local_experts", ffn.moe_num_experts), ("num_experts_per_tok", ffn.moe_top_k),
                       ("intermediate_size", ffn.ffn_hidden_size), ("norm_topk_prob", p is not None),
                       ("clip_qkv", attn.clip_qkv), ("num_key_value_heads", attn.kv_n_heads),
                       ("head_dim", cfg.d_model // cfg.n_heads)):
        object.__setattr__(flat, key, value)
    return flat


_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # config activation -> the engine's


def act_name(cfg: Any) -> str:
    """The gated MLPs' and experts' activation (hidden_act / hidden_activation, as transformers' ACT2FN reads it) by
    the engine's name: "silu" or "gelu_tanh"; any other is refused by name."""
    keys = ("hidden_act", "hidden_activation", "activation_function")  # activation_function: JetMoE's
    key = next((k for k in keys if config_get(cfg, k) is not None), "hidden_act")
    act = config_get(cfg, key, default="silu")
    if act not in _ACTS:
        raise ModelSpecError(f"config.{key}={act!r}: gated MLPs and experts must use silu or gelu_pytorch_tanh")
    return _ACTS[act]


def per_layer_input(cfg: Any) -> int:
    """The width per layer of the per-layer input embeddings (hidden_size_per_layer_input; 0: none). Their table
    must cover the vocabulary (vocab_size_per_layer_input = vocab_size): transformers fails on a token past it."""
    width = int(config_get(cfg, "hidden_size_per_layer_input", default=0) or 0)
    rows = config_get(cfg, "vocab_size_per_layer_input", default=cfg.vocab_size)
    if width and rows != cfg.vocab_size:
        raise ModelSpecError(f"config.vocab_size_per_layer_input={rows}: want vocab_size ({cfg.vocab_size}), a "
                             f"per-layer input for every token")
    return width
