"""Jamba's Mamba (v1) layers in a ModelSpec (Mamba1Spec), derived from a config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from elasticmoe.model.family_config import ModelSpecError, act_name, config_get as _get

KINDS = ("full_attention", "linear_attention")  # config.layer_types (Jamba's "attention" / "mamba", renamed)


@dataclass(frozen=True)
class Mamba1Spec:
    """Mamba (v1) mixers (Jamba): in_proj to [x ; z] (inner channels each), a causal depthwise conv + SiLU over x,
    x_proj to [dt (dt_rank) ; B ; C (d_state each)], RMSNorms of dt, B and C, dt = softplus(dt_proj(dt)), the
    selective scan per channel (state [inner, d_state], decayed by exp(dt * A) with A = -exp(A_log) [inner, d_state],
    fed dt * B * x, read by C, plus D * x), times silu(z), out_proj."""

    inner: int  # mamba_expand * hidden_size
    d_state: int
    dt_rank: int
    conv_kernel: int
    conv_bias: bool  # the conv carries a bias
    proj_bias: bool  # in_proj and out_proj carry biases
    layers: tuple[bool, ...]  # per layer: Mamba (True) or full attention
    act: str = "silu"  # the conv's activation (hidden_act; the gate is always SiLU)
    prefix: str = "mamba."  # the layer's module, under the decoder layer

    f32_roles = ("A_log", "D")  # loaded in float32, as the scan reads them

    @property
    def f32_floats(self) -> int:
        """float32 values the layer derives at load beside its conv's copy: -exp(A_log) [inner, d_state]."""
        return self.inner * self.d_state

    @property
    def conv_dim(self) -> int:
        return self.inner

    @property
    def rec_shape(self) -> tuple[int, ...]:
        """One sequence's recurrent state: [inner, d_state] (float32)."""
        return self.inner, self.d_state

    @property
    def weights(self) -> dict[str, str]:
        """role -> checkpoint suffix under the layer's prefix (biases only where the config builds them)."""
        names = {"in": "in_proj.weight", "conv": "conv1d.weight", "x_proj": "x_proj.weight",
                 "dt_proj": "dt_proj.weight", "dt_proj_bias": "dt_proj.bias", "A_log": "A_log", "D": "D",
                 "dt_norm": "dt_layernorm.weight", "b_norm": "b_layernorm.weight", "c_norm": "c_layernorm.weight",
                 "out": "out_proj.weight"}
        names.update({"conv_bias": "conv1d.bias"} if self.conv_bias else {})
        names.update({"in_bias": "in_proj.bias", "out_bias": "out_proj.bias"} if self.proj_bias else {})
        return {r: self.prefix + s for r, s in names.items()}

    def shapes(self, hidden: int) -> dict[str, tuple[int, ...]]:
        """role -> the shape transformers builds."""
        n, r, c = self.inner, self.dt_rank, self.d_state
        return {"in": (2 * n, hidden), "in_bias": (2 * n,), "conv": (n, 1, self.conv_kernel), "conv_bias": (n,),
                "x_proj": (r + 2 * c, n), "dt_proj": (n, r), "dt_proj_bias": (n,), "A_log": (n, c), "D": (n,),
                "dt_norm": (r,), "b_norm": (c,), "c_norm": (c,), "out": (hidden, n), "out_bias": (hidden,)}

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return self.conv_dim * (self.conv_kernel - 1), math.prod(self.rec_shape)


def _positive(cfg: Any, key: str) -> int:
    value = getattr(cfg, key, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"config.{key}={value!r}: want a positive integer")
    return value


def jamba_layer_types(cfg: Any, num_layers: int) -> list[str]:
    """Per layer, "linear_attention" (Mamba) or "full_attention": layer i attends where i % attn_layer_period ==
    attn_layer_offset (transformers' JambaConfig.layers_block_type); an offset not below the period fails by name."""
    period, offset = getattr(cfg, "attn_layer_period", None), getattr(cfg, "attn_layer_offset", None)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ModelSpecError(f"config.attn_layer_period={period!r}: want a positive integer")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < period:
        raise ModelSpecError(f"config.attn_layer_offset={offset!r}: want 0 <= offset < attn_layer_period={period}")
    return ["full_attention" if i % period == offset else "linear_attention" for i in range(num_layers)]


def jamba_sparse_layers(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    """Per layer: MoE where i % expert_layer_period == expert_layer_offset (else a dense MLP)."""
    period, offset = getattr(cfg, "expert_layer_period", None), getattr(cfg, "expert_layer_offset", None)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ModelSpecError(f"config.expert_layer_period={period!r}: want a positive integer")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < period:
        raise ModelSpecError(f"config.expert_layer_offset={offset!r}: want 0 <= offset < expert_layer_period={period}")
    return tuple(i % period == offset for i in range(num_layers))


def mamba1_from_config(cfg: Any, num_layers: int) -> Mamba1Spec:
    """Jamba's Mamba layers: mamba_expand, mamba_d_state, mamba_dt_rank ("auto": ceil(hidden / 16)), mamba_d_conv,
    mamba_conv_bias, mamba_proj_bias; the layers by attn_layer_period / offset. An impossible shape fails naming the
    field."""
    types = jamba_layer_types(cfg, num_layers)
    expand, d_state, kernel = (_positive(cfg, k) for k in ("mamba_expand", "mamba_d_state", "mamba_d_conv"))
    if getattr(cfg, "mamba_dt_rank", None) == "auto":
        rank = math.ceil(cfg.hidden_size / 16)
    else:
        rank = _positive(cfg, "mamba_dt_rank")
    return Mamba1Spec(inner=expand * cfg.hidden_size, d_state=d_state, dt_rank=rank, conv_kernel=kernel,
                      conv_bias=bool(_get(cfg, "mamba_conv_bias")), proj_bias=bool(_get(cfg, "mamba_proj_bias")),
                      layers=tuple(t == "linear_attention" for t in types), act=act_name(cfg))
