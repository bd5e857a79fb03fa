"""Public fused-MoE entry point: validates inputs and dispatches to the torch or Triton backend."""

from __future__ import annotations

import os

import torch

from .act import ExpertAct
from .checks import check_act, check_count, check_moe_inputs, check_out_dtype
from .fp8 import check_fp8_weights, dequantize_block_fp8, dequantize_w13, is_fp8, triton_runs_fp8
from .torch_moe import fused_moe_torch

BACKENDS = ("auto", "torch", "triton")
BACKEND_ENV = "ELASTICMOE_MOE_BACKEND"


def resolve_backend(backend: str, device: torch.device, fp8: bool = False) -> str:
    """Map `backend` ("auto" | "torch" | "triton") to a concrete backend for tensors on `device`.

    An explicit "torch"/"triton" argument wins; for "auto" the env var ELASTICMOE_MOE_BACKEND
    (torch|triton) forces a backend, otherwise CUDA tensors get triton and anything else torch;
    fp8 (float8_e4m3fn weights): torch on CUDA GPUs before sm_89, where Triton has no fp8e4nv; triton asked for
    there (argument or env var) raises ValueError rather than failing inside Triton's compiler.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; expected one of {BACKENDS}")
    forced = os.environ.get(BACKEND_ENV, "").strip().lower() if backend == "auto" else ""
    if forced and forced != "auto" and forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}; expected torch, triton or auto")
    chosen = backend if backend != "auto" else forced if forced and forced != "auto" else None
    if chosen == "triton" and fp8 and not triton_runs_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        how = f"{BACKEND_ENV}=triton" if backend == "auto" else "backend='triton'"
        raise ValueError(f"{how} cannot run float8_e4m3fn weights on {device} (compute capability {major}.{minor}): "
                         "Triton has no fp8e4nv before sm_89; use backend 'torch' (or 'auto'), which dequantizes them")
    if chosen is not None:
        return chosen
    return "triton" if device.type == "cuda" and (not fp8 or triton_runs_fp8(device)) else "torch"


def fused_moe(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    act_quant: bool = False,
    split_scales: bool | None = None,
    act: ExpertAct | None = None,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed-experts forward: out[t] = sum_j topk_weights[t, j] * expert(topk_ids[t, j])(hidden[t]).

    hidden [T, H]; w13 [E, 2I, H] (rows :I gate, I: up); w2 [E, H, I];
    topk_ids [T, k] int32/int64 (-1 = skip); topk_weights [T, k] fp32, fp16 or bf16 (used in fp32).
    expert e(x) = (silu(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T; act (act.ExpertAct) swaps the gated
    activation (tanh-GELU, GPT-OSS's SwiGLU, clamps) and b13 [E, 2I], b2 [E, H] add biases (both or neither):
    e(x) = act(x @ w13[e].T + b13[e]) @ w2[e].T + b2[e], the activation in fp32 on both backends.
    Returns [T, H] in out_dtype (default hidden's dtype); the top-k reduction accumulates in fp32, or in
    fp64 for out_dtype float64 (partial sums from several shards then add up exactly), and is rounded once, into
    out_dtype (the Triton backend's slot products are fp32, the torch backend's in the weights' dtype).
    T may be 0, and so may E (every id is then skipped).
    Block-FP8 weights: w13, w2 float8_e4m3fn with w13_scale [E, ceil(2I/bn), ceil(H/bk)] and w2_scale
    [E, ceil(H/bn), ceil(I/bk)] float32 (weight_scale_inv; layouts in fp8.py), block_shape (bn, bk), default
    (128, 128), split_scales: w13_scale's gate/up layout (None: from its shape). The math then runs in
    hidden's dtype: the Triton backend reads the fp8 weights as they are (W8A16; act_quant=True: W8A8,
    activations quantized per token and bk-group on the fly, bk a multiple of 32, else ValueError), the torch
    backend dequantizes them blockwise first (act_quant is a Triton-only option and ignored there).
    """
    fp8 = check_moe_inputs(hidden, w13, w2, topk_ids, topk_weights, w13_scale, w2_scale, block_shape, split_scales)
    check_out_dtype(out_dtype)
    bias = check_act(act, b13, b2, w13, w2)
    chosen = resolve_backend(backend, hidden.device, fp8 is not None)  # a bad backend is refused at T = 0 too
    if hidden.shape[0] == 0 or topk_ids.shape[1] == 0 or w13.shape[0] == 0:  # nothing routed here: zeros
        return torch.zeros_like(hidden, dtype=out_dtype or hidden.dtype)  # [T, H]
    if chosen == "torch":
        if fp8 is not None:  # dequantize to hidden's dtype, then the usual path
            w13 = dequantize_w13(w13, w13_scale, fp8["block_shape"], hidden.dtype, fp8["split"])  # [E, 2I, H]
            w2 = dequantize_block_fp8(w2, w2_scale, fp8["block_shape"], hidden.dtype)  # [E, H, I]
        return fused_moe_torch(hidden, w13, w2, topk_ids, topk_weights, out_dtype=out_dtype, checked=True, act=act,
                               bias=bias)
    from .triton_moe import fused_moe_triton  # lazy: importing triton must wait for TRITON_INTERPRET

    if fp8 is not None:
        fp8["act_quant"] = act_quant
    return fused_moe_triton(hidden, w13, w2, topk_ids, topk_weights, fp8=fp8, checked=True,
                            out_dtype=out_dtype, act=act, bias=bias)  # [T, H]


def warmup_moe(w13: torch.Tensor, w2: torch.Tensor, top_k: int, backend: str = "auto",
               hidden_dtype: torch.dtype | None = None, w13_scale: torch.Tensor | None = None,
               w2_scale: torch.Tensor | None = None, block_shape: tuple[int, int] | None = None,
               act_quant: bool = False, split_scales: bool | None = None,
               out_dtype: torch.dtype | None = None, act: ExpertAct | None = None,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> int:
    """Compile, at model load, every Triton kernel variant that fused_moe can launch with these weights.

    A no-op (returns 0) when `backend` resolves to torch for w13's device, or when this shape was
    warmed before; otherwise returns the number of 1-token warm-up passes run. Block-FP8 weights: pass
    their scales (and block_shape, act_quant) as to fused_moe, and hidden_dtype, the activations' dtype;
    out_dtype as the calls will (default hidden's). top_k (the router's, >= 1) and out_dtype are checked whatever
    the backend; act, b13, b2 as the calls' (each activation, with or without biases, compiles its own variant).
    """
    check_count("top_k", top_k)
    check_out_dtype(out_dtype)
    bias = check_act(act, b13, b2, w13, w2)
    if resolve_backend(backend, w13.device, is_fp8(w13)) != "triton" or w13.shape[0] == 0:
        return 0
    from .triton_moe import warmup_triton  # lazy: importing triton must wait for TRITON_INTERPRET

    fp8 = None
    if is_fp8(w13):
        fp8 = dict(check_fp8_weights(w13, w2, w13_scale, w2_scale, block_shape, split_scales), act_quant=act_quant)
        if hidden_dtype is None:
            raise ValueError("warming block-FP8 weights needs hidden_dtype (the activations' dtype)")
    return warmup_triton(w13, w2, top_k, hidden_dtype, fp8=fp8, out_dtype=out_dtype, act=act, bias=bias)
