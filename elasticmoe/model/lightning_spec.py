"""MiniMax's lightning (linear) attention layers and residual factors in a ModelSpec, derived from a config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from elasticmoe.model.family_config import ModelSpecError, act_name, config_get as _get

KINDS = ("full_attention", "linear_attention")  # MiniMax's config.layer_types
# role -> checkpoint suffix under the layer's prefix: its weights, then the buffers transformers saves beside them
# (the per-head decay rates and the decays of a block it derives from them; read at load, never kept)
WEIGHTS = {"qkv": "self_attn.qkv_proj.weight", "gate": "self_attn.output_gate.weight", "norm": "self_attn.norm.weight",
           "out": "self_attn.out_proj.weight"}
BUFFERS = {"slope": "self_attn.slope_rate", "query_decay": "self_attn.query_decay",
           "key_decay": "self_attn.key_decay", "diagonal_decay": "self_attn.diagonal_decay"}
_FACTORS = ("full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
            "mlp_alpha_factor", "mlp_beta_factor")


@dataclass(frozen=True)
class LightningSpec:
    """Lightning attention (MiniMax-Text-01): act(qkv_proj) -> q, k, v per head (no scaling); a linear attention
    whose past decays by exp(-slope) per token (one slope per head and layer), in blocks of block_size tokens for a
    prompt, over a recurrent state [heads, d, d] per sequence; an RMSNorm (eps 1e-6), a sigmoid output gate of the
    layer's input, out_proj. Its per-slot state (DeltaState) is that state alone: no conv window (conv_dim 0,
    conv_kernel 1 make an empty one)."""

    num_heads: int
    head_dim: int
    block_size: int
    num_layers: int  # config.num_hidden_layers: the slopes fall with the layer's depth
    act: str  # config.hidden_act on qkv_proj's output (family_config.act_name)
    layers: tuple[bool, ...]  # per layer: lightning (True) or full attention

    conv_dim = 0  # no conv window
    conv_kernel = 1
    buffers = tuple(BUFFERS)  # roles read at load (the slopes used, the decays checked), held by no layer

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def rec_shape(self) -> tuple[int, ...]:
        """One sequence's recurrent state: [heads, d, d] (float32): the decayed sum of k^T v."""
        return self.num_heads, self.head_dim, self.head_dim

    @property
    def weights(self) -> dict[str, str]:
        """role -> checkpoint suffix under the layer's prefix (the buffers optional: derived when absent)."""
        return {**WEIGHTS, **BUFFERS}

    @property
    def f32_floats(self) -> int:
        """float32 values the layer keeps beside its weights: the slopes [heads]."""
        return self.num_heads

    def state_floats(self) -> tuple[int, int]:
        """(conv window, recurrent state) values one sequence keeps per layer."""
        return 0, self.num_heads * self.head_dim * self.head_dim

    def slopes(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s decay rate per head [heads] float32, as transformers derives it where the checkpoint
        stores none: (2 ** (-8 / heads)) ** (1 .. heads), times 1 - layer / (num_layers - 1 + 1e-5) + 1e-5."""
        base = 1 / (2 ** (8 / self.num_heads))
        depth = 1 - layer / (self.num_layers - 1 + 1e-5) + 1e-5
        return base ** (torch.arange(self.num_heads) + 1) * depth

    def decays(self, slope: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
        """A block of `length` tokens' decays from slope [heads, 1, 1] (float32): transformers' buffers when length
        is block_size. -> (query [heads, length, 1]: exp(-s (i + 1)), key [heads, length, 1]: exp(-s (length - 1 -
        j)), diagonal [1, heads, length, length]: exp(-s (i - j)) for j <= i, else 0)."""
        n = torch.arange(length, device=slope.device) + 1  # [c]
        query, key = torch.exp(-slope * n[:, None]), torch.exp(-slope * (length - n[:, None]))
        gap = slope * (n[:, None] - n[None, :])[None, None]  # [1, h, c, c]
        return query, key, torch.exp(torch.where(gap >= 0, -gap, float("-inf")))


def lightning_from_config(cfg: Any, num_layers: int) -> LightningSpec:
    """MiniMax's layer kinds (config.layer_types: linear_attention / full_attention) and its lightning layers'
    shape; an impossible value fails naming the field."""
    types = _get(cfg, "layer_types") or ()
    if len(types) != num_layers or set(types) - set(KINDS):
        raise ModelSpecError(f"config.layer_types={list(types)!r}: want {num_layers} of {' / '.join(KINDS)}")
    heads = cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim") or cfg.hidden_size // heads
    block = _get(cfg, "block_size")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ModelSpecError(f"config.block_size={block!r}: want a positive integer")
    return LightningSpec(num_heads=heads, head_dim=head_dim, block_size=block, num_layers=num_layers,
                         act=act_name(cfg), layers=tuple(t == "linear_attention" for t in types))


def residual_factors(cfg: Any, spec: LightningSpec) -> tuple[tuple[float, float, float, float], ...]:
    """Per layer (attention alpha, beta, MLP alpha, beta): MiniMax's residual adds alpha * the sublayer's normed
    input + beta * its output; the attention's by the layer's kind. A factor that is not a finite number fails
    naming it."""
    values = {}
    for key in _FACTORS:
        value = _get(cfg, key, default=1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelSpecError(f"config.{key}={value!r}: want a finite number")
        values[key] = float(value)
    mlp = values["mlp_alpha_factor"], values["mlp_beta_factor"]
    return tuple((values[f"{k}_attn_alpha_factor"], values[f"{k}_attn_beta_factor"], *mlp)
                 for k in ("linear" if lin else "full" for lin in spec.layers))
