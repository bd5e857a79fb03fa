"""Input checks of the fused-MoE entry points (fused_moe, fused_moe_torch, fused_moe_triton), naming the argument."""

from __future__ import annotations

import torch

from .act import ExpertAct
from .fp8 import FP8_DTYPE, check_fp8_weights, is_fp8

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ID_DTYPES = (torch.int32, torch.int64)
FP8_DTYPES = (FP8_DTYPE,)
OUT_DTYPES = FLOAT_DTYPES + (torch.float64,)


def check_out_dtype(out_dtype) -> None:
    """Raise ValueError unless out_dtype is None (hidden's dtype) or a float dtype the result can take (an int one
    truncated the sums, float8 rounded them to 3 bits)."""
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be None (hidden's dtype), float32, float16, bfloat16 or float64, "
                         f"got {out_dtype!r}")


def check_count(name: str, value) -> None:
    """Raise ValueError naming the argument unless value is an int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _shapes(hidden, w13, w2, topk_ids, topk_weights) -> None:
    """Raise ValueError naming the argument unless hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k]."""
    for name, t, dims, layout in (("hidden", hidden, 2, "[T, H]"), ("w13", w13, 3, "[E, 2I, H]"),
                                  ("w2", w2, 3, "[E, H, I]"), ("topk_ids", topk_ids, 2, "[T, k]")):
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, h13 = w13.shape
    if two_i % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} must be [E, 2I, H] (gate rows, then up rows): dim 1 is odd")
    if h13 != hidden_size:
        raise ValueError(f"w13 {tuple(w13.shape)} does not match hidden {tuple(hidden.shape)}: "
                         f"expected w13 [E, 2I, {hidden_size}]")
    if tuple(w2.shape) != (num_experts, hidden_size, two_i // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)} and hidden: "
                         f"expected w2 [E, H, I] = {(num_experts, hidden_size, two_i // 2)}")
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} must be [T, k] with T = {num_tokens} (hidden's rows)")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} must have topk_ids' shape "
                         f"{tuple(topk_ids.shape)}")


def _plain_ok(hidden, w13, w2, topk_ids, topk_weights, weight_dtypes) -> bool:
    """Whether the five tensors pass _check_all's checks but the block scales', each attribute read once (~1.5 us:
    it runs per MoE layer and step), with w13 and w2 of one of weight_dtypes. False where any may fail (or in a
    rare valid case, such as a row view with a unit last stride that is not contiguous): _check_all decides."""
    hs, ws, vs, ids = hidden.shape, w13.shape, w2.shape, topk_ids.shape
    if len(hs) != 2 or len(ws) != 3 or len(ids) != 2 or ws[1] % 2 or ws[2] != hs[1] or ids[0] != hs[0]:
        return False
    if vs != (ws[0], hs[1], ws[1] // 2) or topk_weights.shape != ids:
        return False
    dtype = w13.dtype
    if w2.dtype != dtype or dtype not in weight_dtypes or hidden.dtype not in FLOAT_DTYPES:
        return False
    if topk_weights.dtype not in FLOAT_DTYPES or topk_ids.dtype not in ID_DTYPES:
        return False
    device = hidden.device
    if w13.device != device or w2.device != device or topk_ids.device != device or topk_weights.device != device:
        return False
    return hidden.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()  # a unit last stride


def check_moe_inputs(hidden, w13, w2, topk_ids, topk_weights, w13_scale=None, w2_scale=None,
                     block_shape=None, split_scales=None) -> dict | None:
    """Raise ValueError naming the bad argument unless hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k].

    Also: w13 and w2 share one float dtype, hidden and topk_weights are floats, topk_ids int32/int64,
    all five tensors sit on one device and hidden, w13, w2 have a unit last stride. Block-FP8 weights
    (float8_e4m3fn w13 and w2 with w13_scale / w2_scale, see fp8.py) are checked too, and described in the
    dict returned (fp8.check_fp8_weights); None for float weights, which must come without scales.
    """
    if w13_scale is None and w2_scale is None and block_shape is None and split_scales is None:
        if _plain_ok(hidden, w13, w2, topk_ids, topk_weights, FLOAT_DTYPES):
            return None
    elif _plain_ok(hidden, w13, w2, topk_ids, topk_weights, FP8_DTYPES):
        return check_fp8_weights(w13, w2, w13_scale, w2_scale, block_shape, split_scales)
    return _check_all(hidden, w13, w2, topk_ids, topk_weights, w13_scale, w2_scale, block_shape, split_scales)


def _check_all(hidden, w13, w2, topk_ids, topk_weights, w13_scale, w2_scale, block_shape, split_scales):
    """check_moe_inputs' every check, each raising its message."""
    _shapes(hidden, w13, w2, topk_ids, topk_weights)
    if topk_ids.dtype not in ID_DTYPES:
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    quantized = is_fp8(w13) or is_fp8(w2)
    given = (w13_scale, w2_scale, block_shape, split_scales)
    if not quantized and any(arg is not None for arg in given):
        raise ValueError(f"w13_scale / w2_scale / block_shape / split_scales are for float8_e4m3fn weights, "
                         f"got {w13.dtype}")
    fp8 = check_fp8_weights(w13, w2, *given) if quantized else None
    floats = (("hidden", hidden), ("topk_weights", topk_weights)) + (() if quantized else (("w13", w13), ("w2", w2)))
    for name, t in floats:
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if w13.dtype != w2.dtype:
        raise ValueError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must share one dtype")
    tensors = {"hidden": hidden, "w13": w13, "w2": w2, "topk_ids": topk_ids, "topk_weights": topk_weights}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all MoE inputs must be on one device, got {devices}")
    for name in ("hidden", "w13", "w2"):
        t = tensors[name]
        if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride (got strides {t.stride()}); "
                             "pass .contiguous()")
    return fp8


def check_act(act, b13, b2, w13, w2) -> tuple | None:
    """Raise ValueError naming the argument unless act is None or an ExpertAct and the biases are both None or
    b13 [E, 2I], b2 [E, H] floats on w13's device with a unit last stride. Returns (b13, b2), or None without."""
    if act is not None and not isinstance(act, ExpertAct):
        raise ValueError(f"act must be a kernels.act.ExpertAct or None, got {type(act).__name__}")
    if b13 is None and b2 is None:
        return None
    if b13 is None or b2 is None:
        raise ValueError("b13 and b2 come together (the experts' gate/up and down biases): got only "
                         f"{'b13' if b2 is None else 'b2'}")
    num_experts, two_i, hidden_size = w13.shape
    for name, t, want in (("b13", b13, (num_experts, two_i)), ("b2", b2, (num_experts, hidden_size))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} {tuple(t.shape)} must be {list(want)} (w13 {tuple(w13.shape)}, "
                             f"w2 {tuple(w2.shape)})")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != w13.device:
            raise ValueError(f"{name} is on {t.device}, the weights on {w13.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride (got strides {t.stride()}); pass .contiguous()")
    return b13, b2
