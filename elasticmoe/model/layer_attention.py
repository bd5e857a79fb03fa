"""Attention that differs per layer, read from a config: windows, rotary layers and types, query heads, output gates."""

from __future__ import annotations

import copy
from typing import Any

import torch

from elasticmoe.model.family import Family
from elasticmoe.model.family_config import ModelSpecError, config_get

LAYER_TYPES = ("full_attention", "sliding_attention")
# rope types whose tables change with the sequence length or past a context limit: a KV cache cannot follow them
_MOVING_ROPES = ("dynamic", "longrope")
PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")  # the per_layer_config overrides the attention follows


def layer_heads(cfg: Any, num_layers: int, kv_heads: int, over: dict[int, dict[str, Any]]) -> tuple[int, ...]:
    """Query heads of each layer from num_attention_heads_per_layer (Laguna) or per_layer_config (`over`, where the
    family allows it: Step-3.7); () when the config has neither (every layer has num_attention_heads). Each must be a
    positive multiple of the KV heads (transformers repeats those)."""
    heads = config_get(cfg, "num_attention_heads_per_layer")
    if heads is None and any("num_attention_heads" in o for o in over.values()):
        heads = [over.get(i, {}).get("num_attention_heads", cfg.num_attention_heads) for i in range(num_layers)]
    if heads is None:
        return ()
    if len(heads) != num_layers:
        raise ModelSpecError(f"config.num_attention_heads_per_layer has {len(heads)} entries for {num_layers} layers")
    for i, h in enumerate(heads):
        if isinstance(h, bool) or not isinstance(h, int) or h < 1 or h % kv_heads:
            raise ModelSpecError(f"config.num_attention_heads_per_layer[{i}]={h!r}: want a positive multiple of "
                                 f"num_key_value_heads ({kv_heads})")
    return tuple(heads)


def moa_fields(cfg: Any, experts: int) -> dict[str, int]:
    """JetMoE's attention (AttentionSpec fields): num_local_experts attention experts (as its MoE's), each of
    num_key_value_heads query heads of kv_channels dims; a token's num_experts_per_tok experts make its query heads
    (whatever config.num_attention_heads says: transformers' attention never reads it)."""
    for key, what in (("kv_channels", "the attention head dim"), ("num_key_value_heads", "heads of each expert")):
        value = config_get(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelSpecError(f"config.{key}={value!r}: want a positive integer ({what})")
    kv_heads = config_get(cfg, "num_key_value_heads")
    return dict(num_heads=kv_heads * config_get(cfg, "num_experts_per_tok"), moa_experts=experts)


def global_view(cfg: Any) -> Any:
    """`cfg`, or for a heterogeneous config (per_layer_config: Gemma 4) a homogeneous copy holding the global values
    (transformers raises on reading a per-layer attribute otherwise); per_layer_overrides gives the layers that
    differ."""
    if not getattr(cfg, "is_heterogeneous", False):
        return cfg
    view = copy.copy(cfg)
    view.__dict__.pop("_heterogeneity_spec", None)
    return view


def per_layer_overrides(cfg: Any, fam: Family) -> dict[int, dict[str, Any]]:
    """Layer index -> the config values it overrides (config.per_layer_config); a key the attention does not follow
    per layer is refused by name (num_attention_heads followed only where Family.per_layer_heads)."""
    raw = cfg.to_dict().get("per_layer_config") or {}
    out = {int(k): dict(v) for k, v in raw.items()}
    keys = PER_LAYER_KEYS + (("num_attention_heads",) if fam.per_layer_heads else ())
    if other := sorted({k for o in out.values() for k in o} - set(keys)):
        raise ModelSpecError(f"config.per_layer_config overrides {other}: only {list(keys)} may vary "
                             f"per layer here")
    return out


def layer_dims(over: dict[int, dict[str, Any]], num_layers: int, head_dim: int, kv_heads: int, heads: int
               ) -> tuple[tuple[int, int], ...]:
    """Per layer (head_dim, num_key_value_heads), where per_layer_config (`over`: per_layer_overrides) makes some
    differ; () when none does. Each a positive int, the KV heads dividing the query heads (transformers repeats
    them)."""
    dims = tuple((o.get("head_dim", head_dim), o.get("num_key_value_heads", kv_heads))
                 for o in (over.get(i, {}) for i in range(num_layers)))
    for i, (d, kv) in enumerate(dims):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d, kv)) or heads % kv:
            raise ModelSpecError(f"config.per_layer_config[{i}]: head_dim={d!r}, num_key_value_heads={kv!r}: want "
                                 f"positive ints, the KV heads dividing num_attention_heads ({heads})")
    return dims if any(d != (head_dim, kv_heads) for d in dims) else ()


def sliding_overrides(cfg: Any, fam: Family, over: dict[int, dict[str, Any]], num_layers: int, kv_heads: int
                      ) -> tuple[dict[int, dict[str, Any]], tuple[bool, ...]]:
    """`over` with the sliding layers' KV heads times Family.sliding_kv_factor (MiMo-V2-Flash: 2), and per layer
    whether it has attention sinks (Family.attn_sinks "sliding": the sliding layers; () when every layer or none)."""
    types = list(config_get(cfg, "layer_types", default=None) or ["full_attention"] * num_layers)
    sliding = [t == "sliding_attention" for t in types]
    if fam.sliding_kv_factor != 1:
        over = {i: {"num_key_value_heads": kv_heads * fam.sliding_kv_factor, **over.get(i, {})} if s
                else over.get(i, {}) for i, s in enumerate(sliding)}
    return over, tuple(sliding) if fam.attn_sinks == "sliding" else ()


def kv_sources(cfg: Any, num_layers: int) -> tuple[int, ...]:
    """Per layer: the layer whose keys and values it attends (itself, or for the last num_kv_shared_layers the last
    earlier layer of its layer type, as transformers' kv_sharing_modes); () when no layer shares."""
    shared = int(config_get(cfg, "num_kv_shared_layers", default=0))
    if not shared:
        return ()
    first = num_layers - shared
    if not 0 < first < num_layers:
        raise ModelSpecError(f"config.num_kv_shared_layers={shared}: want 0 to {num_layers - 1} (the first layer "
                             f"computes its own keys and values)")
    types = list(config_get(cfg, "layer_types", default=None) or ["full_attention"] * num_layers)
    out = list(range(first))
    for i in range(first, num_layers):
        producers = [j for j in range(first) if types[j] == types[i] and types[j] in LAYER_TYPES]
        if not producers:
            raise ModelSpecError(f"config.num_kv_shared_layers={shared}: layer {i} ({types[i]}) has no earlier "
                                 f"attention layer of its type to share keys and values with")
        out.append(producers[-1])
    return tuple(out)


def v_from_k(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    """Per layer: its values are its key projection (attention_k_eq_v, on the layers that are not sliding)."""
    if not config_get(cfg, "attention_k_eq_v", default=False):
        return ()
    types = list(config_get(cfg, "layer_types", default=None) or ["full_attention"] * num_layers)
    return tuple(t != "sliding_attention" for t in types)


def typed_rope(cfg: Any) -> dict[str, dict] | None:
    """rope_parameters keyed by layer type ({"full_attention": {...}, "sliding_attention": {...}}: Laguna, Mellum;
    Beam's {"sliding_attention": {...}, "full_attention": null}), or None when the config has one rotary for every
    layer."""
    params = config_get(cfg, "rope_parameters")
    if not isinstance(params, dict) or not params or not set(params) <= set(LAYER_TYPES):
        return None
    return params


def rope_tables(cfg: Any, head_dims: tuple[int, ...], partial: bool, nope: bool = False, factor: float = 1.0
                ) -> tuple[list[tuple[torch.Tensor, float]], tuple[int, ...], tuple[bool, ...]]:
    """Per-layer-type rotary, as transformers' per-type rotary embeddings build it: (the tables, each an inverse
    frequency [dim / 2] and its cos/sin scale, one per rotating layer type in sorted order), each layer's table and
    whether it rotates. head_dims: each layer's (one per type: its table is built for it; Gemma 4's full layers have
    their own). A default rope's dims are head_dim * partial_rotary_factor, theta ** (-2i / dim); other types come
    from transformers' initialisers (Gemma 4's "proportional": every dim, the unrotated share at frequency 0).
    `partial`: the family's attention rotates only a table's dims (Laguna); else every dim, and a narrower table is
    refused (Mellum: transformers fails every forward); `factor`: an entry's partial_rotary_factor when it has none
    (Family.rope_partial). `nope`: a type whose entry is null runs without rotary
    (Beam: its layers get table 0, unused); else a null entry is refused as a missing one."""
    params, num_layers = typed_rope(cfg), len(head_dims)
    types = list(config_get(cfg, "layer_types") or ["full_attention"] * num_layers)
    if len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise ModelSpecError(f"config.layer_types={types!r}: want {num_layers} of {LAYER_TYPES}")
    order = sorted(set(types))
    for t in order:
        if t not in params:  # transformers looks every layer type up: a missing one fails its load
            raise ModelSpecError(f"config.rope_parameters.{t} is missing: layers of that type need "
                                 f"{'an entry (null: no rotary)' if nope else 'a rotary'}")
    rotating, tables = [t for t in order if not (nope and params[t] is None)], []
    for t in rotating:
        dims = {d for d, lt in zip(head_dims, types) if lt == t}
        if len(dims) > 1:
            raise ModelSpecError(f"config.per_layer_config: {t} layers of head dims {sorted(dims)} (their rotary is "
                                 f"one per layer type)")
        head_dim = dims.pop()
        tables.append(_table(cfg, params[t], t, head_dim, factor))
        if 2 * len(tables[-1][0]) < head_dim and not partial:
            raise ModelSpecError(f"config.rope_parameters.{t}.partial_rotary_factor="
                                 f"{(params[t] or {}).get('partial_rotary_factor', factor)}: model_type "
                                 f"{cfg.model_type!r} rotates every head dim (transformers fails every forward)")
    tables = tables or [(torch.zeros(0), 1.0)]  # all NoPE: none
    sets = tuple(rotating.index(t) if t in rotating else 0 for t in types)
    return tables, sets, tuple(t in rotating for t in types)


def _table(cfg: Any, p: dict | None, layer_type: str, head_dim: int, factor: float = 1.0
           ) -> tuple[torch.Tensor, float]:
    """One layer type's inverse frequencies [dim / 2] float32 and cos/sin scale."""
    where = f"config.rope_parameters.{layer_type}"
    if not isinstance(p, dict):  # transformers builds no rotary for it, and its layers then fail every forward
        raise ModelSpecError(f"{where} is missing: layers of that type need a rotary")
    rope_type = p.get("rope_type", "default")
    if rope_type in _MOVING_ROPES:
        raise ModelSpecError(f"{where}.rope_type={rope_type!r} is not supported per layer type")
    if rope_type == "default":
        theta = p.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
            raise ModelSpecError(f"{where}.rope_theta={theta!r}: the rotary needs a positive base")
        dim = int(head_dim * p.get("partial_rotary_factor", factor))
        if dim < 2:
            raise ModelSpecError(f"{where}.partial_rotary_factor={p.get('partial_rotary_factor')!r}: rotates no dims")
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelSpecError(f"{where}.rope_type={rope_type!r} is not supported")
    typed = copy.copy(cfg)  # that type's head_dim (Gemma 4: per_layer_config), which the initialisers read
    typed.__dict__["head_dim"] = head_dim
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](typed, torch.device("cpu"), layer_type=layer_type)
    return inv.float(), float(scale)


def gate_fields(cfg: Any, act: str | None) -> dict[str, Any]:
    """The gate on the attention output of a family that names its activation (Family.attn_gate: self_attn.g_proj),
    and whether it has one value per head (config.gating true or "per-head", as Laguna reads it) or one per output
    feature; {} for the others (AFMoE's gate_proj: sigmoid per feature)."""
    if act is None:
        return {}
    gating = config_get(cfg, "gating", default=True)
    if gating not in (True, False, "per-head", "per-element"):
        raise ModelSpecError(f"config.gating={gating!r}: want true / 'per-head' or 'per-element'")
    return dict(out_gate=act, gate_per_head=gating is True or gating == "per-head", gate_name="g_proj")


def layer_windows(cfg: Any, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: its sliding window, None for full attention (config.sliding_window on the layer_types' sliding
    layers, or on every layer without layer_types)."""
    window = config_get(cfg, "sliding_window")
    if window is None or config_get(cfg, "use_sliding_window", default=True) is False:
        return (None,) * num_layers
    # MiniMax: its layer types are full / linear attention, and sliding_window applies to every full one
    types = config_get(cfg, "layer_types") if cfg.model_type != "minimax" else None
    windows = tuple(window if t == "sliding_attention" else None for t in types) if types else (window,) * num_layers
    if any(w is not None and w < 1 for w in windows):  # transformers' window mask then keeps no key: it fails
        raise ModelSpecError(f"config.sliding_window={window}: a sliding layer needs a window of 1 or more tokens "
                             f"(null, or use_sliding_window: false, for full attention)")
    return windows


def layer_ropes(cfg: Any, fam: Family, windows: tuple[int | None, ...], sparse: tuple[bool, ...]) -> tuple[bool, ...]:
    """Per layer: rotary applied. NoPE families rotate only their sliding layers (all layers without a window);
    GraniteMoeSWA rotates the layers whose layer_rope_theta is set."""
    thetas = config_get(cfg, "layer_rope_theta")
    if thetas is not None:
        if len(thetas) != len(windows):
            raise ModelSpecError(f"config.layer_rope_theta has {len(thetas)} entries for {len(windows)} layers")
        return tuple(bool(t) for t in thetas)
    if "position_embedding_type" in fam.keys:  # GraniteMoeHybrid: rotary only when it is "rope" (null, "nope": NoPE)
        return (config_get(cfg, "position_embedding_type") == "rope",) * len(windows)
    if cfg.model_type == "llama4_text":  # no_rope_layers: 1 = rotary, 0 = NoPE
        return tuple(bool(r) for r in cfg.no_rope_layers)
    if fam.nope:  # Kimi-Linear's MLA: no rotary anywhere
        return (False,) * len(windows)
    if not fam.nope_full_layers:
        return (True,) * len(windows)
    types = config_get(cfg, "layer_types") or ()
    sliding = [t == "sliding_attention" for t in types] or [w is not None for w in windows]
    if fam.block == "parallel":  # Cohere2: windowed layers, and dense prefix layers when the prefix pattern is 1
        force = config_get(cfg, "prefix_dense_sliding_window_pattern", default=None) == 1
        return tuple(w is not None or (force and not sp) for w, sp in zip(windows, sparse))
    if cfg.model_type == "flint":  # rotary on the windowed layers only: none without a window
        return tuple(w is not None for w in windows)
    if fam.block == "pre" and config_get(cfg, "sliding_window") is None:  # EXAONE: no window, rotary everywhere
        return (True,) * len(windows)
    return tuple(sliding)
