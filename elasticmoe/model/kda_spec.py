"""Kimi Delta Attention's layers of a ModelSpec (Kimi-Linear), derived from a config: shapes and tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elasticmoe.model.family_config import ModelSpecError, config_get as _get

_ATTN = "self_attn."
# role -> checkpoint suffix under the layer's prefix, or its alternatives: the hub's names (the forget gate's weights
# on self_attn, q / k / v convs apart), then transformers' in-memory ones (self_attn.forget_gate.*, one conv1d)
KDA_WEIGHTS: dict[str, str | tuple[str, ...]] = {
    "q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight",
    "q_conv": "q_conv1d.weight", "k_conv": "k_conv1d.weight", "v_conv": "v_conv1d.weight", "conv": "conv1d.weight",
    "f_a": ("f_a_proj.weight", "forget_gate.f_a_proj.weight"),
    "f_b": ("f_b_proj.weight", "forget_gate.f_b_proj.weight"),
    "dt_bias": ("dt_bias", "forget_gate.dt_bias"), "A_log": ("A_log", "forget_gate.A_log"),
    "b": "b_proj.weight", "g_a": "g_a_proj.weight", "g_b": "g_b_proj.weight", "o_norm": "o_norm.weight",
    "o": "o_proj.weight",
}
CONVS = ("q_conv", "k_conv", "v_conv")  # the hub's convs, one per q / k / v; else "conv", the three stacked


@dataclass(frozen=True)
class KDASpec:
    """Kimi Delta Attention: q, k, v projections through one causal depthwise conv + SiLU, a per-channel forget gate
    (low rank f_a / f_b, dt_bias, A_log per head), beta = sigmoid(b_proj), the delta rule over a recurrent state
    [heads, head_dim, head_dim] per sequence, an RMSNorm gated by sigmoid(g_b(g_a(x))) and o_proj."""

    num_heads: int
    head_dim: int
    conv_kernel: int
    layers: tuple[bool, ...]  # per layer: KDA (True) or full attention (MLA)

    @property
    def qkv_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: q, k and v."""
        return 3 * self.qkv_dim

    @property
    def rec_shape(self) -> tuple[int, ...]:
        """One sequence's recurrent state: [heads, head_dim, head_dim] (float32)."""
        return self.num_heads, self.head_dim, self.head_dim

    @property
    def weights(self) -> dict[str, tuple[str, ...]]:
        """role -> checkpoint suffixes (alternatives, the first found) under the layer's prefix."""
        return {r: tuple(_ATTN + n for n in ((s,) if isinstance(s, str) else s)) for r, s in KDA_WEIGHTS.items()}

    @property
    def f32_floats(self) -> int:
        """float32 values the layer derives at load beside its conv's copy: -exp(A_log) [heads]."""
        return self.num_heads

    f32_only = ("conv", *CONVS)  # held only as one float32 conv (the stacked copy), not in the model's dtype

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return self.conv_dim * (self.conv_kernel - 1), self.num_heads * self.head_dim * self.head_dim


def kda_from_config(cfg: Any, num_layers: int) -> KDASpec:
    """Kimi-Linear's KDA layers: config.layer_types as transformers derives it (from linear_attn_config's 1-based
    kda_layers / full_attn_layers where the checkpoint has them), linear_head_dim, linear_num_heads,
    linear_conv_kernel_dim (from linear_attn_config too); an impossible value fails naming the field."""
    types = list(_get(cfg, "layer_types") or ())
    if len(types) != num_layers or set(types) - {"linear_attention", "full_attention"}:
        raise ModelSpecError(f"config.layer_types={types!r} (or linear_attn_config's kda_layers / full_attn_layers, "
                             f"1-based): want {num_layers} of linear_attention / full_attention")
    sizes = {}
    for key in ("linear_num_heads", "linear_head_dim", "linear_conv_kernel_dim"):
        value = getattr(cfg, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelSpecError(f"config.{key}={value!r} (or linear_attn_config's): want a positive integer")
        sizes[key] = value
    heads, kv_heads = cfg.num_attention_heads, _get(cfg, "num_key_value_heads", default=cfg.num_attention_heads)
    if kv_heads != heads:  # its MLA repeats the expanded keys per KV group again: every forward fails
        raise ModelSpecError(f"config.num_key_value_heads={kv_heads}: Kimi-Linear's MLA runs in transformers only "
                             f"with num_attention_heads ({heads})")
    act = _get(cfg, "hidden_act", default="silu")
    if act != "silu":  # its conv's activation (transformers' ACT2FN[hidden_act]); only SiLU is implemented
        raise ModelSpecError(f"config.hidden_act={act!r}: Kimi Delta Attention's conv runs SiLU only here")
    return KDASpec(num_heads=sizes["linear_num_heads"], head_dim=sizes["linear_head_dim"],
                   conv_kernel=sizes["linear_conv_kernel_dim"], layers=tuple(t == "linear_attention" for t in types))
