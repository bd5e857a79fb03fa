"""Host side of the Triton fused MoE: align on device, launch gate/up, down and top-k-sum kernels.

Pipeline per chunk of at most `chunk_tokens` tokens (6 launches, no host sync; N = T * k pairs,
B blocks of BLOCK_M slots):
  align      topk_ids [T, k] -> sorted_token_ids [B * BM], expert_ids [B], num_tokens_post_padded [1]
             (3 multi-program kernels, triton_align.py)
  gate_up    x [T, H] gathered by slot, x w13[e]^T, silu(gate) * up   -> act [B * BM, I] (sorted rows)
  down       act x w2[e]^T, times topk_weights                         -> pair_out [N, H] fp32
  topk_sum   sum over the k slots of each token (fp32, skips -1 slots) -> out [T, H] out_dtype (default hidden's)
Writing pair_out and summing (instead of fp32 atomics into [T, H]) keeps the result deterministic,
needs no zero-fill launch and handles -1 slots; chunking bounds pair_out to chunk_tokens * k * H * 4 bytes.
Every launch runs under torch.cuda.device(tensors' device): Triton launches on the current device.
Block-FP8 weights (fp8 = {w13_scale, w2_scale, block_shape, act_quant}, see fp8.py) go to the same two GEMM
kernels as they are, with their scales; x and act then stay in hidden's dtype.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from .align import max_num_blocks
from .act import ExpertAct
from .checks import check_act, check_count, check_moe_inputs, check_out_dtype
from .interp import interpreting
from .triton_align import align_block_size_triton
from .triton_gemm import down_kernel, gate_up_kernel, topk_sum_kernel
from .tuning import candidate_configs, check_quant_tiles, get_config

CHUNK_ENV = "ELASTICMOE_MOE_CHUNK_TOKENS"
DEFAULT_CHUNK_TOKENS = 4096  # DeepSeek-V3 shard (k=8, H=7168): pair_out <= 0.94 GB whatever the batch
TOPK_SUM_TILE = 2048  # elements per top-k-sum program: BLOCK_T tokens x BLOCK_H columns
_warm: set[tuple] = set()


def chunk_tokens_default() -> int:
    """Tokens per chunk: $ELASTICMOE_MOE_CHUNK_TOKENS, else DEFAULT_CHUNK_TOKENS."""
    raw = os.environ.get(CHUNK_ENV, "").strip()
    if not raw:
        return DEFAULT_CHUNK_TOKENS
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # '²'.isdigit(), and int() refuses it
        raise ValueError(f"{CHUNK_ENV}={raw!r}: expected a positive number of tokens")
    return int(raw)


def device_guard(device: torch.device):
    """torch.cuda.device(device) for CUDA tensors (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_options(cfg: dict, dtype: torch.dtype, fp8: dict | None = None) -> dict:
    """Keyword arguments of both GEMM launches for a tile config; dtype: the activations'."""
    options = dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if fp8 is not None:
        group_n, group_k = fp8["block_shape"]
        check_quant_tiles(cfg, group_k, fp8["act_quant"])
        options.update(W_FP8=True, A_FP8=bool(fp8["act_quant"]), GROUP_N=group_n, GROUP_K=group_k)
    return options


def quant_key(hidden_dtype: torch.dtype, fp8: dict | None) -> tuple | None:
    """tuning's quant argument: (activation dtype, bk, act_quant) for block-FP8 weights, else None."""
    return None if fp8 is None else (hidden_dtype, fp8["block_shape"][1], bool(fp8["act_quant"]))


def fused_moe_triton(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    config: dict | None = None,
    chunk_tokens: int | None = None,
    fp8: dict | None = None,
    checked: bool = False,
    out_dtype: torch.dtype | None = None,
    act: ExpertAct | None = None,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton MoE forward. hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, k] -> [T, H] in out_dtype.

    config: tile dict (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); default: tuning.get_config.
    chunk_tokens: tokens per pipeline pass, an int >= 1 (default None: $ELASTICMOE_MOE_CHUNK_TOKENS or 4096).
    fp8: block-FP8 weights' {w13_scale, w2_scale, block_shape (bn, bk), split, act_quant} (split: w13_scale's
    gate/up layout, default from its shape). checked: the caller ran checks.check_moe_inputs (fused_moe does,
    and passes its fp8 dict); else the inputs are checked here, before any launch reads them.
    out_dtype: the result's (default hidden's; checks.OUT_DTYPES): the top-k sum is written in it as summed (in fp32,
    in fp64 for float64), not rounded to hidden's dtype first (a shard's float64 partial sums then add up as one).
    act: the gated activation (act.py; default SiLU), computed in fp32 in gate_up's epilogue; bias: (b13 [E, 2I],
    b2 [E, H]) added in fp32 to gate/up before it and to each expert's down product before its weight.
    Needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1, where bfloat16 is refused: Triton 3.9's
    interpreter computes it wrongly (bf16 runs on a GPU only; the torch backend runs it on CPU).
    """
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError("the triton MoE backend needs CUDA tensors (or TRITON_INTERPRET=1 for tests)")
    if chunk_tokens is not None:
        check_count("chunk_tokens", chunk_tokens)
    if not checked:
        check_out_dtype(out_dtype)
        fp8 = _checked_fp8(hidden, w13, w2, topk_ids, topk_weights, fp8)
        bias = check_act(act, *(bias or (None, None)), w13, w2)
    if fp8 is not None and act is not None and act.input_scaled:
        raise ValueError("input-scaled experts (Llama 4) with block-FP8 weights: not in the Triton kernels; "
                         "dequantize them (keep_fp8=False) or use the torch backend")
    if interpreting() and torch.bfloat16 in (hidden.dtype, w13.dtype):
        raise ValueError("bfloat16 MoE inputs under TRITON_INTERPRET=1: the interpreter computes bf16 wrongly; "
                         "bf16 runs on a CUDA GPU only (on CPU use the torch backend, or float16 / float32)")
    num_tokens, hidden_size = hidden.shape
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    if num_tokens == 0 or top_k == 0 or num_experts == 0:  # E = 0: every id skipped (tiles divide by E)
        return torch.zeros_like(hidden, dtype=out_dtype or hidden.dtype)  # [T, H]
    chunk = min(num_tokens, chunk_tokens or chunk_tokens_default())  # chunk_tokens: None or >= 1
    with device_guard(hidden.device):
        act_dtype = hidden.dtype if fp8 else w13.dtype
        cfg = config or get_config(num_experts, w2.shape[2], hidden_size, w13.dtype, chunk, hidden.device, top_k,
                                   quant_key(act_dtype, fp8))
        launch = launch_options(cfg, act_dtype, fp8)
        x = hidden if hidden.dtype == act_dtype else hidden.to(act_dtype)  # [T, H]
        scales = _scale_args(w13, fp8)
        epilogue = _epilogue(act, bias)
        ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()  # [T, k]
        weights = topk_weights.to(torch.float32).contiguous()  # [T, k]
        out = torch.empty(num_tokens, hidden_size, dtype=out_dtype or hidden.dtype, device=hidden.device)  # [T, H]
        act_buf, pair_out = _buffers(chunk, top_k, w13, launch["BLOCK_M"], act_dtype)
        for start in range(0, num_tokens, chunk):
            stop = min(num_tokens, start + chunk)
            _forward_chunk(x[start:stop], w13, w2, ids[start:stop], weights[start:stop], launch,
                           act_buf, pair_out, out[start:stop], scales, epilogue)
    return out


def _checked_fp8(hidden, w13, w2, topk_ids, topk_weights, fp8: dict | None) -> dict | None:
    """check_moe_inputs for a direct call; returns the checked fp8 dict (None for float weights)."""
    fp8 = fp8 or {}
    checked = check_moe_inputs(hidden, w13, w2, topk_ids, topk_weights, fp8.get("w13_scale"), fp8.get("w2_scale"),
                               fp8.get("block_shape"), fp8.get("split"))
    return None if checked is None else dict(checked, act_quant=bool(fp8.get("act_quant", False)))


NO_SCALES = ((None, 0, 0, 0, 0), (None, 0, 0, 0))
PLAIN = (((None, 0), {}), ((None, 0), {}))  # _epilogue(None, None): silu(gate) * up, no biases, weighted output


def _epilogue(act: ExpertAct | None, bias: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """((gate_up's bias args, constexprs), (down's bias args, constexprs)) for the activation and biases."""
    if act is None or act.plain:
        if bias is None:
            return PLAIN
        consts13 = {}
    else:
        consts13 = dict(ACT=act.code, LIMIT=float(act.limit), ALPHA=float(act.alpha), SCALE_INPUT=act.input_scaled)
    consts2 = {"SCALE_INPUT": True} if consts13.get("SCALE_INPUT") else {}
    if bias is None:
        return ((None, 0), consts13), ((None, 0), consts2)
    b13, b2 = bias
    return ((b13, b13.stride(0)), dict(consts13, HAS_BIAS=True)), ((b2, b2.stride(0)), dict(consts2, HAS_BIAS=True))


def _scale_args(w13: torch.Tensor, fp8: dict | None) -> tuple[tuple, tuple]:
    """Scale arguments of gate_up (ptr, 3 strides, up_scale_base) and down (ptr, 3 strides); unused unless fp8."""
    if fp8 is None:
        return NO_SCALES
    from .fp8 import up_scale_base

    s13, s2 = fp8["w13_scale"], fp8["w2_scale"]
    split = fp8.get("split")
    if split is None:
        from .fp8 import split_layout

        split = split_layout(w13.shape[1], s13.shape[1], fp8["block_shape"][0], None)
    base = up_scale_base(w13.shape[1], fp8["block_shape"][0], split)
    return (s13, *s13.stride(), base), (s2, *s2.stride())


def _buffers(chunk: int, top_k: int, w13: torch.Tensor, block_m: int,
             act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """act [B * BLOCK_M, I] (act_dtype) and pair_out [chunk * k, H] fp32, reused by every chunk."""
    num_experts, two_i, hidden_size = w13.shape
    blocks = max_num_blocks(chunk * top_k, num_experts, block_m)
    act = torch.empty(blocks * block_m, two_i // 2, dtype=act_dtype, device=w13.device)
    pair_out = torch.empty(chunk * top_k, hidden_size, dtype=torch.float32, device=w13.device)
    return act, pair_out


def _forward_chunk(x, w13, w2, ids, weights, launch, act, pair_out, out, scales=NO_SCALES, epilogue=PLAIN) -> None:
    """One pass of the pipeline over x [t, H] / ids, weights [t, k]; writes out [t, H]."""
    num_pairs = ids.numel()
    routing = align_block_size_triton(ids, w13.shape[0], launch["BLOCK_M"])  # sorted_ids, expert_ids, num_post
    gate_up(x, w13, routing, ids.shape[1], launch, act, scales[0], epilogue[0], weights.reshape(-1))
    down(act, w2, weights.reshape(-1), routing, num_pairs, launch, pair_out[:num_pairs], scales[1], epilogue[1])
    topk_sum(pair_out[:num_pairs], ids.reshape(-1), w13.shape[0], out)


def gate_up(x, w13, routing, top_k, launch, act, scale_args=NO_SCALES[0], epilogue=PLAIN[0],
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """act [B * BLOCK_M, I] = silu(gate) * up (or epilogue's activation and bias) for every sorted slot (padding
    rows left unwritten)."""
    inter = w13.shape[1] // 2
    num_pid_m = routing[1].numel()
    grid = (num_pid_m * triton.cdiv(inter, launch["BLOCK_N"]),)
    gate_up_kernel[grid](
        x, w13, act, *routing,
        x.shape[0] * top_k, x.shape[1], inter, num_pid_m,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0), act.stride(1),
        *scale_args, *epilogue[0], weights, TOP_K=top_k, **launch, **epilogue[1],
    )
    return act


def down(act, w2, weights, routing, num_pairs, launch, pair_out, scale_args=NO_SCALES[1],
         epilogue=PLAIN[1]) -> torch.Tensor:
    """pair_out [N, H] fp32 = topk_weight * (act @ w2[e]^T (+ b2[e])) per (token, slot) pair; -1 pairs unwritten."""
    hidden_size, inter = w2.shape[1], w2.shape[2]
    num_pid_m = routing[1].numel()
    grid = (num_pid_m * triton.cdiv(hidden_size, launch["BLOCK_N"]),)
    down_kernel[grid](
        act, w2, pair_out, weights, *routing,
        num_pairs, hidden_size, inter, num_pid_m,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), pair_out.stride(0),
        *scale_args, *epilogue[0], **launch, **epilogue[1],
    )
    return pair_out


def topk_sum(pair_out, ids, num_experts, out) -> torch.Tensor:
    """out [T, H] = sum of pair_out [T * k, H] over each token's valid slots (fp32; fp64 for a float64 out), cast to
    out's dtype."""
    num_tokens, hidden_size = out.shape
    block_h = min(triton.next_power_of_2(hidden_size), 1024)
    block_t = max(2, TOPK_SUM_TILE // block_h)  # independent of T: one compile per (H, k, dtypes)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden_size, block_h))
    topk_sum_kernel[grid](
        pair_out, ids, out, num_tokens, hidden_size, num_experts, out.stride(0),
        TOP_K=ids.numel() // num_tokens, BLOCK_T=block_t, BLOCK_H=block_h, ACC64=out.dtype == torch.float64,
        num_warps=4,
    )
    return out


def warmup_triton(w13: torch.Tensor, w2: torch.Tensor, top_k: int, hidden_dtype: torch.dtype | None = None,
                  id_dtypes=(torch.int64, torch.int32), fp8: dict | None = None,
                  out_dtype: torch.dtype | None = None, act: ExpertAct | None = None,
                  bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """Compile every kernel variant a call with these weights can launch; returns the passes run (0: done before).

    One 1-token pass per candidate tile config and id dtype: runtime sizes are not specialised on,
    so later batches of any size reuse these compiles. Weights are only read. fp8: as fused_moe_triton's
    (block-FP8 weights need hidden_dtype, the activations' dtype); out_dtype: the calls' (the top-k sum's kernel
    is compiled per output dtype); act, bias: as the calls' (each activation is its own compile).
    """
    check_count("top_k", top_k)
    check_out_dtype(out_dtype)
    hidden_dtype = hidden_dtype or w13.dtype
    num_experts, hidden_size = w13.shape[0], w13.shape[2]
    device = w13.device
    quant = quant_key(hidden_dtype, fp8)
    configs = candidate_configs(num_experts, w2.shape[2], hidden_size, w13.dtype, device, quant)
    key = (tuple(w13.shape), w13.dtype, hidden_dtype, top_k, str(device), tuple(id_dtypes), quant,
           out_dtype or hidden_dtype, tuple(tuple(c.items()) for c in configs), act, bias is not None)
    if key in _warm:
        return 0
    runs = 0
    with device_guard(device):
        x = torch.zeros(1, hidden_size, dtype=hidden_dtype, device=device)  # [1, H]
        weights = torch.full((1, top_k), 1.0 / top_k, device=device)  # [1, k]
        for cfg in configs:
            for id_dtype in id_dtypes:
                ids = (torch.arange(top_k, device=device) % num_experts).to(id_dtype)[None]  # [1, k]
                fused_moe_triton(x, w13, w2, ids, weights, config=cfg, fp8=fp8, out_dtype=out_dtype, act=act,
                                 bias=bias)
                runs += 1
    _warm.add(key)
    return runs
