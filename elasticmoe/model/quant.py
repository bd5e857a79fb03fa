"""Quantized checkpoints: which quantization_config is understood, and block-FP8 / MXFP4 weights dequantized."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elasticmoe.model.family_config import ModelSpecError

# The 16 values of an FP4 (E2M1) nibble; a byte holds two, low nibble first.
_FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_SCALE_SUFFIX = "_scale_inv"  # "x.weight" is scaled by "x.weight_scale_inv" (packed: "x.gate_up_proj_scale_inv")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class QuantError(ModelSpecError):
    """A quantization_config (or a quantized tensor) that cannot be used; the message names the file or field."""


@dataclass(frozen=True)
class QuantFormat:
    """How a checkpoint's weights are stored: "none", "fp8" (block-scaled, weight_scale_inv) or "mxfp4"."""

    method: str = "none"
    block: tuple[int, int] | None = None  # fp8: [rows, cols] of weight per scale; None = one scale per tensor


def quant_format(raw_config: dict[str, Any], config_file: Path | str) -> QuantFormat:
    """The format a config.json declares; any other quant_method (gptq, awq, bitsandbytes, ...) is rejected."""
    q = raw_config.get("quantization_config")
    if not q:
        return QuantFormat()
    if not isinstance(q, dict):
        raise QuantError(f"{config_file}: quantization_config={q!r} is not an object (quant_method, ...)")
    method = q.get("quant_method")
    if method == "mxfp4":
        return QuantFormat("mxfp4")
    if method != "fp8":
        raise QuantError(f"{config_file}: quantization_config.quant_method={method!r} is not supported (elasticmoe "
                         "dequantizes block-FP8 'fp8' and 'mxfp4' checkpoints on load; no other format)")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantError(f"{config_file}: quantization_config.activation_scheme={q['activation_scheme']!r}: only "
                         "'dynamic' FP8 (weights scaled, activations not pre-scaled) is supported")
    if q.get("fmt", "e4m3") not in ("e4m3", "float8_e4m3fn"):
        raise QuantError(f"{config_file}: quantization_config.fmt={q['fmt']!r}: only e4m3 FP8 is supported")
    block = q.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise QuantError(f"{config_file}: quantization_config.weight_block_size={block!r}: want [rows, cols], two "
                         "whole numbers >= 1")
    return QuantFormat("fp8", tuple(block) if block else None)


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...]:
    """The weight_scale_inv shape of an FP8 weight [..., N, K]: [..., ceil(N/bn), ceil(K/bk)] (per-tensor: [])."""
    if block is None:
        return ()
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def fp8_scale_float(scale_inv: torch.Tensor) -> torch.Tensor:
    """weight_scale_inv as float32: stored as floats, or as E8M0 exponent bytes (uint8: 2**(s - 127), the
    "ue8m0" scale format; 0xFF: NaN)."""
    if scale_inv.dtype == torch.uint8:
        return _e8m0_scaled(torch.ones(scale_inv.shape, dtype=torch.float32), scale_inv)
    return scale_inv.to(torch.float32)


def _e8m0_scaled(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values times 2**(s - 127) for the E8M0 bytes `scales` (uint8, broadcast to values), NaN where a byte
    is 0xFF: the OCP MX spec's NaN scale, which makes its whole block NaN (2**(255 - 127) would give inf, or 0 times
    it 0)."""
    return torch.ldexp(values, scales.to(torch.int32) - 127).masked_fill_(scales == 0xFF, float("nan"))


def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 weight [..., N, K] times its per-block scales [..., ceil(N/bn), ceil(K/bk)] (fp8_scale_float; edge
    blocks partial), in float32, returned in `dtype`. block None: one scale for the whole tensor."""
    w = weight.to(torch.float32)
    s = fp8_scale_float(scale_inv)
    if block is None:
        return (w * s.reshape(())).to(dtype)
    n, k = w.shape[-2:]
    s = s.repeat_interleave(block[0], dim=-2)[..., :n, :]  # [..., N, ceil(K/bk)]
    full, rem = divmod(k, block[1])
    out = torch.empty_like(w)
    out[..., : full * block[1]] = (w[..., : full * block[1]].unflatten(-1, (full, block[1]))
                                   * s[..., :full, None]).flatten(-2)
    if rem:
        out[..., full * block[1]:] = w[..., full * block[1]:] * s[..., full:]
    return out.to(dtype)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [..., G, 16] uint8 (two E2M1 codes a byte, low nibble first) and E8M0 scales [..., G] uint8
    (2**(s - 127) per group of 32; 0xFF: NaN) -> float32 [..., G * 32]."""
    lut = torch.tensor(_FP4, dtype=torch.float32)
    b = blocks.to(torch.int64)
    vals = torch.stack((lut[b & 0x0F], lut[b >> 4]), dim=-1).flatten(-2)  # [..., G, 32]
    vals = _e8m0_scaled(vals, scales[..., None])
    return vals.flatten(-2)
