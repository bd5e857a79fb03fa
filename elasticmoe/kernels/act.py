"""The experts' gated activation (SiLU, tanh-GELU, GPT-OSS's SwiGLU) and its clamp: one contract for every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("silu", "gelu_tanh", "swiglu_oai")  # index = the Triton kernels' ACT code


@dataclass(frozen=True)
class ExpertAct:
    """How an expert joins its gate and up rows ([n, I] each, in float32) into the down projection's input.

    silu / gelu_tanh: act(gate) * up; a `limit` L > 0 clamps act(gate) to <= L and up to [-L, L] first (Step-3.7).
    swiglu_oai (GPT-OSS): gate clamped to <= L, up to [-L, L] (L > 0), then (up + 1) * gate * sigmoid(alpha * gate).
    input_scaled (Llama 4): the routing weight scales the expert's input (rounded to its dtype), not its output.
    """

    kind: str = "silu"
    limit: float = 0.0  # 0: no clamp
    alpha: float = 1.702  # swiglu_oai's sigmoid slope
    input_scaled: bool = False  # expert(w * x), summed unweighted

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"expert activation {self.kind!r}: expected one of {KINDS}")
        for name in ("limit", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"expert activation {name} must be a finite number, got {value!r}")
        if not isinstance(self.input_scaled, bool):
            raise ValueError(f"expert activation input_scaled must be a bool, got {self.input_scaled!r}")
        if self.limit < 0:
            raise ValueError(f"expert activation limit must be >= 0 (0: no clamp), got {self.limit!r}")

    @property
    def code(self) -> int:
        return KINDS.index(self.kind)

    @property
    def plain(self) -> bool:
        """Gated SiLU without a clamp on the weighted output: the fused kernels' default path."""
        return self.kind == "silu" and not self.limit and not self.input_scaled

    def apply(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up [n, I] -> [n, I] in their dtype (compute them in float32 for the kernels' numerics)."""
        lim = self.limit
        if self.kind == "swiglu_oai":
            if lim:
                gate, up = gate.clamp(max=lim), up.clamp(-lim, lim)
            return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        gate = F.silu(gate) if self.kind == "silu" else F.gelu(gate, approximate="tanh")
        if lim:
            gate, up = gate.clamp(max=lim), up.clamp(-lim, lim)
        return gate * up


SILU = ExpertAct()
