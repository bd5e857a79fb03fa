"""The per-slot-state layers of a ModelSpec (Gated DeltaNet, LFM2's short convolutions, Mamba2, ...), from a config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from elasticmoe.model.family import Family
from elasticmoe.model.family_config import ModelSpecError, config_get as _get
from elasticmoe.model.kda_spec import KDASpec, kda_from_config
from elasticmoe.model.lightning_spec import LightningSpec, lightning_from_config
from elasticmoe.model.mamba1_spec import Mamba1Spec, mamba1_from_config

LAYER_KINDS = ("full_attention", "linear_attention")  # config.layer_types of a family with linear attention


@dataclass(frozen=True)
class DeltaNetSpec:
    """Gated DeltaNet (Qwen3-Next): a causal depthwise conv over [q ; k ; v], then the gated delta rule over a
    recurrent state [v_heads, k_dim, v_dim] per sequence, a gated RMSNorm and out_proj."""

    num_k_heads: int
    num_v_heads: int  # a multiple of num_k_heads: each q/k head serves num_v_heads // num_k_heads value heads
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    layers: tuple[bool, ...]  # per layer: Gated DeltaNet (True) or full attention

    f32_roles = ()  # every weight in the model's dtype

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: q, k and v."""
        return 2 * self.key_dim + self.value_dim

    @property
    def rec_shape(self) -> tuple[int, ...] | None:
        """One sequence's recurrent state: [v_heads, k_dim, v_dim] (float32)."""
        return self.num_v_heads, self.head_k_dim, self.head_v_dim

    @property
    def weights(self) -> dict[str, str]:
        """role -> checkpoint suffix under the layer's prefix."""
        return {r: f"linear_attn.{s}" for r, s in LINEAR.items()}

    @property
    def f32_floats(self) -> int:
        """float32 values the layer derives at load beside its conv's copy: -exp(A_log) [v_heads]."""
        return self.num_v_heads

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return self.conv_dim * (self.conv_kernel - 1), self.num_v_heads * self.head_k_dim * self.head_v_dim


@dataclass(frozen=True)
class ShortConvSpec:
    """LFM2's short convolutions: in_proj to [B ; C ; x] (H each), B * x through a causal depthwise conv of
    conv_kernel taps over the sequence, C times its output, out_proj. Its state: the conv window alone."""

    hidden_size: int
    conv_kernel: int  # conv_L_cache
    bias: bool  # conv_bias: in_proj, conv and out_proj carry biases
    layers: tuple[bool, ...]  # per layer: short conv (True) or full attention

    rec_shape = None  # no recurrent state
    f32_floats = 0
    f32_roles = ()  # every weight in the model's dtype

    @property
    def conv_dim(self) -> int:
        return self.hidden_size

    @property
    def weights(self) -> dict[str, str]:
        """role -> checkpoint suffix under the layer's prefix (biases only where conv_bias makes them)."""
        names = {"in": "conv.in_proj.weight", "conv": "conv.conv.weight", "out": "conv.out_proj.weight"}
        if self.bias:
            names.update(in_bias="conv.in_proj.bias", conv_bias="conv.conv.bias", out_bias="conv.out_proj.bias")
        return names

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return self.conv_dim * (self.conv_kernel - 1), 0


@dataclass(frozen=True)
class Mamba2Spec:
    """Mamba2 (state-space) layers: in_proj to [z ; x B C ; dt], a causal depthwise conv + SiLU over [x ; B ; C],
    the selective scan per head (state [head_dim, d_state], decayed by exp(dt * A), fed dt * x (x) B, read by C, plus
    D * x), a gated RMSNorm per group, out_proj. Field names are the math's; the config's are read by the builder."""

    num_heads: int
    head_dim: int
    d_state: int
    n_groups: int  # B and C per group of num_heads // n_groups heads; the gated norm per group of channels
    conv_kernel: int
    conv_bias: bool  # the conv carries a bias
    proj_bias: bool  # in_proj and out_proj carry biases
    dt_limit: tuple[float, float]  # dt clamped to it after the softplus
    layers: tuple[bool, ...]  # per layer: Mamba2 (True) or full attention
    prefix: str = "mamba."  # the layer's module, under the decoder layer

    f32_roles = ("dt_bias", "A_log", "D")  # loaded in float32, as the scan reads them

    @property
    def f32_floats(self) -> int:
        """float32 values the layer derives at load beside its conv's copy: -exp(A_log) [heads]."""
        return self.num_heads

    @property
    def inner(self) -> int:
        """Channels of x (and z, and the norm): heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x, B and C."""
        return self.inner + 2 * self.n_groups * self.d_state

    @property
    def rec_shape(self) -> tuple[int, ...]:
        """One sequence's recurrent state: [heads, head_dim, d_state] (float32)."""
        return self.num_heads, self.head_dim, self.d_state

    @property
    def weights(self) -> dict[str, str]:
        """role -> checkpoint suffix under the layer's prefix (biases only where the config builds them)."""
        names = {"in": "in_proj.weight", "conv": "conv1d.weight", "dt_bias": "dt_bias", "A_log": "A_log", "D": "D",
                 "norm": "norm.weight", "out": "out_proj.weight"}
        names.update({"conv_bias": "conv1d.bias"} if self.conv_bias else {})
        names.update({"in_bias": "in_proj.bias", "out_bias": "out_proj.bias"} if self.proj_bias else {})
        return {r: self.prefix + s for r, s in names.items()}

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return self.conv_dim * (self.conv_kernel - 1), math.prod(self.rec_shape)


# ModelSpec.linear's kinds
LinearSpec = DeltaNetSpec | ShortConvSpec | Mamba2Spec | Mamba1Spec | LightningSpec | KDASpec


def _positive(cfg: Any, key: str) -> int:
    value = getattr(cfg, key, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"config.{key}={value!r}: want a positive integer")
    return value


def mamba2_from_config(cfg: Any, num_layers: int) -> Mamba2Spec:
    """GraniteMoeHybrid's Mamba2 layers (config.layer_types "linear_attention"; the hub's "mamba", which transformers
    renames): mamba_n_heads, mamba_d_head, mamba_d_state, mamba_n_groups, mamba_d_conv, mamba_conv_bias,
    mamba_proj_bias, time_step_limit. An impossible shape fails naming the field."""
    types = _get(cfg, "layer_types") or ()
    if len(types) != num_layers or set(types) - set(LAYER_KINDS):
        raise ModelSpecError(f"config.layer_types={list(types)!r}: want {num_layers} of {' / '.join(LAYER_KINDS)}")
    heads, head_dim, d_state, groups, kernel = (_positive(cfg, k) for k in (
        "mamba_n_heads", "mamba_d_head", "mamba_d_state", "mamba_n_groups", "mamba_d_conv"))
    if heads % groups:
        raise ModelSpecError(f"config.mamba_n_groups={groups} does not divide mamba_n_heads={heads}")
    limit = getattr(cfg, "time_step_limit", None)
    if not isinstance(limit, (list, tuple)) or len(limit) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit) or not limit[0] <= limit[1]:
        shown = list(limit) if isinstance(limit, tuple) else limit
        raise ModelSpecError(f"config.time_step_limit={shown!r}: want [min, max] (transformers' scan clamps dt to it)")
    return Mamba2Spec(num_heads=heads, head_dim=head_dim, d_state=d_state, n_groups=groups, conv_kernel=kernel,
                      conv_bias=bool(_get(cfg, "mamba_conv_bias")), proj_bias=bool(_get(cfg, "mamba_proj_bias")),
                      dt_limit=(float(limit[0]), float(limit[1])), layers=tuple(t == "linear_attention" for t in types))


def linear_from_config(cfg: Any, num_layers: int, fam: Family) -> LinearSpec | None:
    """The layers with a per-slot state that config.layer_types names: LFM2's "conv" (Family.linear_attn
    "short_conv"), Mamba2's "linear_attention" ("mamba2"), Jamba's Mamba ("mamba1", by attn_layer_period / offset),
    MiniMax's lightning "linear_attention" ("lightning"), Kimi Delta Attention's ("kda"), else Gated DeltaNet's
    (deltanet_from_config)."""
    if fam.linear_attn == "kda":
        return kda_from_config(cfg, num_layers)
    if fam.linear_attn == "mamba2":
        return mamba2_from_config(cfg, num_layers)
    if fam.linear_attn == "mamba1":  # Jamba: its layers by attn_layer_period / offset
        return mamba1_from_config(cfg, num_layers)
    if fam.linear_attn == "lightning":  # MiniMax: its linear_attention layers are lightning attention
        return lightning_from_config(cfg, num_layers)
    if fam.linear_attn != "short_conv":
        return deltanet_from_config(cfg, num_layers, fam)
    types = _get(cfg, "layer_types") or ()
    if len(types) != num_layers or set(types) - {"conv", "full_attention"}:
        raise ModelSpecError(f"config.layer_types={list(types)!r}: want {num_layers} of conv / full_attention")
    kernel = getattr(cfg, "conv_L_cache", None)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1:
        raise ModelSpecError(f"config.conv_L_cache={kernel!r}: want a positive integer")
    return ShortConvSpec(hidden_size=cfg.hidden_size, conv_kernel=kernel, bias=bool(_get(cfg, "conv_bias")),
                         layers=tuple(t == "conv" for t in types))


def deltanet_from_config(cfg: Any, num_layers: int, fam: Family) -> DeltaNetSpec | None:
    """The linear-attention layers config.layer_types names ("linear_attention"), None when it names none; a
    family without them, an unknown layer type or an impossible shape fails naming the field."""
    types = _get(cfg, "layer_types") or ()
    if "linear_attention" not in types:
        return None
    if fam.linear_attn != "gated_deltanet":  # LFM2 included: its layer types are conv / full_attention
        raise ModelSpecError(f"config.layer_types: model_type {cfg.model_type!r} has no linear-attention layers "
                             "elasticmoe runs")
    if len(types) != num_layers or set(types) - set(LAYER_KINDS):
        raise ModelSpecError(f"config.layer_types={list(types)!r}: want {num_layers} of {' / '.join(LAYER_KINDS)}")
    sizes = {}
    for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim"):
        value = getattr(cfg, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelSpecError(f"config.{key}={value!r}: want a positive integer")
        sizes[key] = value
    nk, nv = sizes["linear_num_key_heads"], sizes["linear_num_value_heads"]
    if nv % nk:
        raise ModelSpecError(f"config.linear_num_value_heads={nv} is not a multiple of linear_num_key_heads={nk}")
    return DeltaNetSpec(num_k_heads=nk, num_v_heads=nv, head_k_dim=sizes["linear_key_head_dim"],
                        head_v_dim=sizes["linear_value_head_dim"], conv_kernel=sizes["linear_conv_kernel_dim"],
                        layers=tuple(t == "linear_attention" for t in types))


# role -> checkpoint suffix under "<layer>.linear_attn.": Qwen3-Next's interleaved in_proj_qkvz / in_proj_ba, or
# Qwen3.5's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
LINEAR = {"qkvz": "in_proj_qkvz.weight", "ba": "in_proj_ba.weight", "qkv": "in_proj_qkv.weight",
          "z": "in_proj_z.weight", "b": "in_proj_b.weight", "a": "in_proj_a.weight", "conv": "conv1d.weight",
          "dt_bias": "dt_bias", "A_log": "A_log", "norm": "norm.weight", "out": "out_proj.weight"}
LAYOUTS = (("qkvz", "ba"), ("qkv", "z", "b", "a"))  # the input projections' two layouts
