"""Block-FP8 expert weights (DeepSeek-V3 layout): checks, blockwise (de)quantization and a float64 reference.

A weight w [.., N, K] float8_e4m3fn comes with scale [.., ceil(N/bn), ceil(K/bk)] float32 (the checkpoint's
`weight_scale_inv`), block_shape = (bn, bk) (`weight_block_size`, (128, 128) as published), and stands for
    w_real[n, k] = float(w[n, k]) * scale[n // bn, k // bk].
w13 [E, 2I, H] stacks gate rows :I and up rows I:. Its scale may come either way: "joint", ceil(2I/bn) rows
(one [2I, H] tensor quantized as a whole), or "split", 2 * ceil(I/bn) rows (gate_proj and up_proj quantized
apart and their scales concatenated; the up rows' scales start at row ceil(I/bn)). Both are the same when
bn divides I; the row count tells them apart unless I % bn > bn / 2, where the caller must say (split_scales).
W8A8 (`act_quant`): activations quantized per token and per group of bk columns, scale = amax / 448, the way
the published DeepSeek-V3 / Qwen3-FP8 kernels do at run time.
"""

from __future__ import annotations

import torch

from .reference import fused_moe_reference

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def triton_runs_fp8(device: torch.device) -> bool:
    """Whether the Triton kernels can take float8_e4m3fn weights on `device`: Triton has no fp8e4nv before
    sm_89 (A100, A10, RTX 30xx refuse to compile it); off CUDA only the interpreter runs them, which can."""
    return device.type != "cuda" or tuple(torch.cuda.get_device_capability(device)) >= (8, 9)


def up_scale_base(two_i: int, bn: int, split: bool) -> int:
    """Row r >= I of w13 (an up row) takes scale row (base + r - I) // bn: base I (joint) or ceil(I/bn) * bn (split)."""
    inter = two_i // 2
    return _cdiv(inter, bn) * bn if split else inter


def split_layout(two_i: int, scale_rows: int, bn: int, split: bool | None) -> bool:
    """Whether w13's scale has the split layout: split_scales as given, else read from its row count."""
    inter = two_i // 2
    if split is None and scale_rows == _cdiv(two_i, bn) == 2 * _cdiv(inter, bn) and inter % bn:
        raise ValueError(f"w13_scale's {scale_rows} rows fit both gate/up layouts (I = {inter}, bn = {bn}): "
                         "pass split_scales=True (gate and up quantized apart) or False (quantized together)")
    return scale_rows == 2 * _cdiv(inter, bn) if split is None else bool(split)


def _block(block_shape) -> tuple[int, int]:
    """block_shape as (bn, bk), or ValueError unless two positive ints."""
    if len(block_shape) != 2 or any(int(b) != b or b < 1 for b in block_shape):
        raise ValueError(f"block_shape must be two positive ints (bn, bk), got {block_shape!r}")
    bn, bk = block_shape
    return int(bn), int(bk)


def check_fp8_weights(w13, w2, w13_scale, w2_scale, block_shape, split_scales: bool | None = None) -> dict:
    """Raise ValueError naming the bad argument unless w13/w2 are float8_e4m3fn with matching block scales.

    Returns {w13_scale, w2_scale, block_shape: (bn, bk), (128, 128) when None, split: bool}. Scales must be
    float32, on the weights' device, w13_scale [E, ceil(2I/bn) (joint) or 2 * ceil(I/bn) (split), ceil(H/bk)]
    and w2_scale [E, ceil(H/bn), ceil(I/bk)]; split_scales (None: from the row count) picks the layout.
    """
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        raise ValueError(f"block scales need float8_e4m3fn w13 and w2, got {w13.dtype} and {w2.dtype}")
    if w13_scale is None or w2_scale is None:
        raise ValueError("float8_e4m3fn weights need both w13_scale and w2_scale (the weight_scale_inv tensors)")
    bn, bk = DEFAULT_BLOCK if block_shape is None else _block(block_shape)
    num_experts, two_i, hidden_size = w13.shape
    inter = two_i // 2
    rows13 = (_cdiv(two_i, bn), 2 * _cdiv(inter, bn)) if split_scales is None else (
        (2 * _cdiv(inter, bn),) if split_scales else (_cdiv(two_i, bn),))
    device = w13.device
    for name, scale, shapes in (
            ("w13_scale", w13_scale, [(num_experts, r, _cdiv(hidden_size, bk)) for r in rows13]),
            ("w2_scale", w2_scale, [(num_experts, _cdiv(hidden_size, bn), _cdiv(inter, bk))])):
        if scale.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {scale.dtype}")
        if scale.shape not in shapes:
            raise ValueError(f"{name} {tuple(scale.shape)} does not fit block {bn}x{bk}: expected "
                             + " or ".join(str(s) for s in dict.fromkeys(shapes)))
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device}, the weights on {device}")
    split = split_layout(two_i, w13_scale.shape[1], bn, split_scales)
    return dict(w13_scale=w13_scale, w2_scale=w2_scale, block_shape=(bn, bk), split=split)


def dequantize_block_fp8(weight: torch.Tensor, scale: torch.Tensor, block_shape=DEFAULT_BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [.., N, K] fp8 with scale [.., ceil(N/bn), ceil(K/bk)] -> [.., N, K] in dtype (product in fp32)."""
    bn, bk = block_shape
    rows, cols = weight.shape[-2:]
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    flat_w, flat_o = weight.reshape(-1, rows, cols), out.view(-1, rows, cols)
    flat_s = scale.reshape(-1, *scale.shape[-2:])
    for i in range(flat_w.shape[0]):  # one [N, K] matrix at a time: fp32 temporaries stay one matrix big
        full = flat_s[i].repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]  # [N, K]
        flat_o[i] = flat_w[i].to(torch.float32).mul_(full)
    return out


def dequantize_w13(w13: torch.Tensor, scale: torch.Tensor, block_shape=DEFAULT_BLOCK,
                   dtype: torch.dtype = torch.float32, split: bool | None = None) -> torch.Tensor:
    """w13 [E, 2I, H] fp8 with a joint or split scale (see the module docstring) -> [E, 2I, H] in dtype."""
    bn = block_shape[0]
    two_i = w13.shape[1]
    inter = two_i // 2
    if not split_layout(two_i, scale.shape[1], bn, split):
        return dequantize_block_fp8(w13, scale, block_shape, dtype)
    gate_rows = _cdiv(inter, bn)
    gate = dequantize_block_fp8(w13[:, :inter], scale[:, :gate_rows], block_shape, dtype)  # [E, I, H]
    up = dequantize_block_fp8(w13[:, inter:], scale[:, gate_rows:], block_shape, dtype)  # [E, I, H]
    return torch.cat([gate, up], dim=1)


def quantize_block_fp8(weight: torch.Tensor, block_shape=DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [.., N, K] float -> (fp8 [.., N, K], scale_inv [.., ceil(N/bn), ceil(K/bk)] fp32), the published way:
    scale_inv = amax(|block|) / 448 (1 for an all-zero block), w_fp8 = w / scale_inv rounded to nearest."""
    bn, bk = block_shape
    rows, cols = weight.shape[-2:]
    pad = weight.new_zeros(*weight.shape[:-2], _cdiv(rows, bn) * bn, _cdiv(cols, bk) * bk, dtype=torch.float32)
    pad[..., :rows, :cols] = weight.float()
    blocks = pad.unflatten(-1, (-1, bk)).unflatten(-3, (-1, bn))  # [.., N/bn, bn, K/bk, bk]
    amax = blocks.abs().amax(dim=(-3, -1))  # [.., N/bn, K/bk]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, -2)[..., :rows, :].repeat_interleave(bk, -1)[..., :cols]  # [.., N, K]
    q = (weight.float() / full).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_act_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """Round-trip x [M, K] through per-token, per-`group`-column fp8 (scale = amax / 448); returns x's dtype."""
    rows, cols = x.shape
    width = _cdiv(cols, group) * group
    padded = x.new_zeros(rows, width, dtype=torch.float32)
    padded[:, :cols] = x.float()
    groups = padded.view(rows, -1, group)  # [M, K/g, g]
    scale = groups.abs().amax(-1, keepdim=True).clamp_min(1e-10) / FP8_MAX  # [M, K/g, 1]
    q = (groups / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * scale
    return q.view(rows, width)[:, :cols].to(x.dtype)


def fused_moe_fp8_reference(hidden, w13, w2, topk_ids, topk_weights, w13_scale, w2_scale,
                            block_shape=DEFAULT_BLOCK, act_quant: bool = False, split: bool | None = None
                            ) -> torch.Tensor:
    """Float64 reference for fp8 experts: dequantize blockwise, then reference.fused_moe_reference -> [T, H].

    act_quant: also round activations the W8A8 way (x before w13, silu(gate) * up in hidden's dtype before
    w2), token by token and expert by expert, as the fused kernel sees them.
    """
    w13_real = dequantize_w13(w13, w13_scale, block_shape, torch.float64, split)  # [E, 2I, H]
    w2_real = dequantize_block_fp8(w2, w2_scale, block_shape, torch.float64)  # [E, H, I]
    if not act_quant:
        return fused_moe_reference(hidden, w13_real, w2_real, topk_ids, topk_weights)
    bk, inter = block_shape[1], w2.shape[2]
    x = quantize_act_groups(hidden.double(), bk)  # [T, H]; q * scale unrounded, as the kernel's fp32 scaling
    out = torch.zeros(hidden.shape, dtype=torch.float64)  # [T, H]
    for t, row in enumerate(topk_ids.tolist()):
        for j, e in enumerate(row):
            if 0 <= e < w13.shape[0]:
                gate_up = w13_real[e] @ x[t]  # [2I]
                act = (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]).to(hidden.dtype)  # [I]
                act = quantize_act_groups(act[None].double(), bk)[0]  # [I]
                out[t] += topk_weights[t, j].double() * (w2_real[e] @ act)  # [H]
    return out.to(hidden.dtype)
