"""Triton kernels of the fused MoE: grouped gate/up GEMM + SiLU, grouped down GEMM x router weight, top-k sum.

Rows are addressed through sorted_token_ids (see align.py): block pid_m holds BLOCK_M pair slots of
one expert (expert_ids[pid_m]); slots holding N are padding and are masked everywhere.
Only sm_90-compilable constructs: constexpr tiles >= 16 for tl.dot, masks for ragged H / I,
scalar early exit on the device-side padded total. Sizes that change per call (pairs, blocks, tokens,
experts) are not specialised on, so a tile config compiles once, not once per batch-size class.
Block-FP8 weights (W_FP8, see fp8.py): each K step's partial dot is scaled by the weight block's scale,
one per column (BLOCK_K divides the scale block GROUP_K); the fp8 values are converted exactly to the
activation dtype (W8A16), or with A_FP8 the activation tile is quantized per row on the fly (scale = amax / 448
over the row's GROUP_K columns, round to nearest) and the dot runs on fp8 operands (W8A8). BLOCK_K == GROUP_K
takes the amax from the tile itself; a GROUP_K that is no power of two (96) has BLOCK_K a power of two dividing
it and each K step also loads its whole group (GROUP_K / BLOCK_K tiles, masked) for the amax.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import interp

interp.install()  # under TRITON_INTERPRET=1 only: device-function calls skip re-patching the language


@triton.jit
def _tile_ids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of program ids -> (pid_m, pid_n)."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _round_e4m3(v):
    """fp32 v (|v| <= 448) rounded to nearest-even float8_e4m3fn values, still fp32.

    The cast alone would do this on a GPU, but Triton 3.9's interpreter rounds fp32 -> fp8e4nv wrongly (ties
    away from zero, a carry into the exponent halves the value: 126.9 -> 64, subnormals off by one step), so
    the rounding happens here and the cast only meets exact values. Normals: round the fp32 mantissa to 3 bits
    on the bit pattern; below 2^-6 (e4m3 subnormals, step 2^-9): add and subtract 1.5 * 2^14.
    """
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    subnormal = (v + 24576.0) - 24576.0
    return tl.where(tl.abs(v) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))


@triton.jit
def _group_amax(row_ptrs, row_ok, k, limit, stride_k, BLOCK_K: tl.constexpr, GROUP_K: tl.constexpr):
    """max |a| [BM] over the GROUP_K-column group holding K step k's tile (columns < limit) of rows row_ptrs [BM],
    read BLOCK_K columns at a time (a [BM, 128] load at once spills at BLOCK_M = 128)."""
    first = (k * BLOCK_K) // GROUP_K * GROUP_K + tl.arange(0, BLOCK_K)  # [BK] the group's first tile's columns
    amax = tl.zeros(row_ok.shape, dtype=tl.float32)  # [BM]
    for j in tl.static_range(GROUP_K // BLOCK_K):
        cols = first + j * BLOCK_K
        a = tl.load(row_ptrs[:, None] + cols[None, :] * stride_k, mask=row_ok[:, None] & (cols < limit)[None, :],
                    other=0.0)  # [BM, BK]
        amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
    return amax


@triton.jit
def _scaled_dot(a, b, acc, b_scale, a_amax, DOT_PRECISION: tl.constexpr, W_FP8: tl.constexpr,
                A_FP8: tl.constexpr, TILE_GROUP: tl.constexpr):
    """acc + a [BM, BK] . b [BK, BN]; fp8 b: the product times b_scale [BN] (and a's per-row scale with A_FP8,
    from the tile's amax with TILE_GROUP (BLOCK_K == GROUP_K), else from a_amax [BM], its group's)."""
    if not W_FP8:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    elif A_FP8:
        a32 = a.to(tl.float32)
        if TILE_GROUP:
            amax = tl.max(tl.abs(a32), axis=1)  # [BM]
        else:
            amax = a_amax
        amax = tl.maximum(amax, 1e-10)  # [BM]
        # IEEE division, not `/` (approximate on a GPU): a scale 1 ulp off moves bf16 activations' many exact
        # e4m3 ties, which cost 0.8-4.6% of the output against the reference on an H200
        a_scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))  # [BM]
        q = _round_e4m3(tl.clamp(tl.math.div_rn(a32, a_scale[:, None]), -448.0, 448.0)).to(tl.float8e4nv)
        out = acc + tl.dot(q, b) * (a_scale[:, None] * b_scale[None, :])
    else:
        out = acc + tl.dot(a, b.to(a.dtype), input_precision=DOT_PRECISION) * b_scale[None, :]
    return out  # one return: the compiler does not stop at a return inside a constexpr branch


@triton.jit
def _gated(g, u, ACT: tl.constexpr, LIMIT: tl.constexpr, ALPHA: tl.constexpr):
    """The experts' activation (kernels.act.ExpertAct) of gate g and up u, fp32 [BM, BN] each. ACT 0: silu(g) * u,
    1: gelu_tanh(g) * u (0.5 (1 + tanh z) = sigmoid(2 z)), each with act(g) <= LIMIT and |u| <= LIMIT where
    LIMIT > 0; 2 (GPT-OSS): g <= LIMIT, |u| <= LIMIT, then (u + 1) * g * sigmoid(ALPHA * g)."""
    if ACT == 2:
        if LIMIT > 0:
            g = tl.minimum(g, LIMIT)
            u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (u + 1.0) * g * tl.sigmoid(ALPHA * g)
    else:
        if ACT == 1:
            a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2 sqrt(2 / pi)
        else:
            a = g * tl.sigmoid(g)
        if LIMIT > 0:
            a = tl.minimum(a, LIMIT)
            u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = a * u
    return out  # one return: the compiler does not stop at a return inside a constexpr branch


@triton.jit(do_not_specialize=["num_pairs", "num_pid_m"])
def gate_up_kernel(
    x_ptr, w13_ptr, act_ptr,  # x [T, H], w13 [E, 2I, H], act [B * BLOCK_M, I] (sorted rows), out
    sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    num_pairs, hidden_size, inter, num_pid_m,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_am, stride_an,
    w_scale_ptr, stride_se, stride_sn, stride_sk, up_scale_base,  # w13_scale [E, 2I/GN, H/GK] (fp8 only)
    b_ptr, stride_be,  # b13 [E, 2I] (HAS_BIAS only)
    topk_weights_ptr,  # [N] (SCALE_INPUT only)
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_FP8: tl.constexpr = False, A_FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128,
    GROUP_K: tl.constexpr = 128, ACT: tl.constexpr = 0, LIMIT: tl.constexpr = 0.0, ALPHA: tl.constexpr = 1.702,
    HAS_BIAS: tl.constexpr = False, SCALE_INPUT: tl.constexpr = False,
):
    """act[slot, n] = act(x[tok] . w13[e, n] (+ b13[e, n]), x[tok] . w13[e, I + n] (+ b13[e, I + n])) for one
    [BLOCK_M, BLOCK_N] tile; act: _gated (silu(gate) * up by default). SCALE_INPUT (Llama 4): x[tok] times the pair's
    routing weight, rounded to x's dtype, in place of x[tok]."""
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] padded slots
    pairs = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_ok = pairs < num_pairs
    tokens = (pairs // TOP_K).to(tl.int64)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    u_ptrs = g_ptrs + inter * stride_wn
    if W_FP8:  # scale rows of the gate and up columns, [BN] each
        gs_ptrs = w_scale_ptr + expert * stride_se + (offs_n // GROUP_N) * stride_sn
        us_ptrs = w_scale_ptr + expert * stride_se + ((up_scale_base + offs_n) // GROUP_N) * stride_sn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SCALE_INPUT:  # the weight as torch multiplies it: in x's dtype
        w_in = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0).to(x_ptr.dtype.element_ty)  # [BM]
    for k in range(0, tl.cdiv(hidden_size, BLOCK_K)):
        k_ok = offs_k < hidden_size - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE_INPUT:
            a = (a.to(tl.float32) * w_in.to(tl.float32)[:, None]).to(x_ptr.dtype.element_ty)  # [BM, BK]
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        gs, us = 1.0, 1.0
        if W_FP8:
            block_k = (k * BLOCK_K) // GROUP_K * stride_sk
            gs = tl.load(gs_ptrs + block_k, mask=col_ok, other=0.0)  # [BN]
            us = tl.load(us_ptrs + block_k, mask=col_ok, other=0.0)  # [BN]
        a_amax = 0.0
        if A_FP8 and BLOCK_K != GROUP_K:
            a_amax = _group_amax(x_ptr + tokens * stride_xm, row_ok, k, hidden_size, stride_xk, BLOCK_K,
                                 GROUP_K)  # [BM]
        acc_g = _scaled_dot(a, g, acc_g, gs, a_amax, DOT_PRECISION, W_FP8, A_FP8, BLOCK_K == GROUP_K)
        acc_u = _scaled_dot(a, u, acc_u, us, a_amax, DOT_PRECISION, W_FP8, A_FP8, BLOCK_K == GROUP_K)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_row = b_ptr + expert * stride_be + offs_n  # [BN]
        acc_g += tl.load(b_row, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_row + inter, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    act = _gated(acc_g, acc_u, ACT, LIMIT, ALPHA)  # [BM, BN] fp32
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :] * stride_an
    tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_pid_m"])
def down_kernel(
    act_ptr, w2_ptr, pair_out_ptr, topk_weights_ptr,  # act [B*BM, I], w2 [E, H, I], pair_out [N, H] fp32
    sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
    num_pairs, hidden_size, inter, num_pid_m,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_pm,
    w_scale_ptr, stride_se, stride_sn, stride_sk,  # w2_scale [E, H/GN, I/GK] (fp8 only)
    b_ptr, stride_be,  # b2 [E, H] (HAS_BIAS only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_FP8: tl.constexpr = False, A_FP8: tl.constexpr = False, GROUP_N: tl.constexpr = 128,
    GROUP_K: tl.constexpr = 128, HAS_BIAS: tl.constexpr = False, SCALE_INPUT: tl.constexpr = False,
):
    """pair_out[p, n] = topk_weights[p] * (act[slot] . w2[e, n] (+ b2[e, n])) for one [BLOCK_M, BLOCK_N] tile;
    unweighted with SCALE_INPUT (the weight scaled gate_up's input)."""
    pid_m, pid_n = _tile_ids(num_pid_m, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pairs = tl.load(sorted_ids_ptr + offs_m)  # [BM]
    row_ok = pairs < num_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_n < hidden_size
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak  # [BM, BK]
    b_ptrs = w2_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    if W_FP8:
        s_ptrs = w_scale_ptr + expert * stride_se + (offs_n // GROUP_N) * stride_sn  # [BN] scale rows
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        k_ok = offs_k < inter - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        scale = 1.0
        if W_FP8:
            scale = tl.load(s_ptrs + (k * BLOCK_K) // GROUP_K * stride_sk, mask=col_ok, other=0.0)  # [BN]
        a_amax = 0.0
        if A_FP8 and BLOCK_K != GROUP_K:
            a_amax = _group_amax(act_ptr + offs_m.to(tl.int64) * stride_am, row_ok, k, inter, stride_ak, BLOCK_K,
                                 GROUP_K)  # [BM]
        acc = _scaled_dot(a, b, acc, scale, a_amax, DOT_PRECISION, W_FP8, A_FP8, BLOCK_K == GROUP_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if not SCALE_INPUT:
        weight = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * weight[:, None]
    o_ptrs = pair_out_ptr + pairs[:, None].to(tl.int64) * stride_pm + offs_n[None, :]
    tl.store(o_ptrs, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_tokens", "num_experts"])
def topk_sum_kernel(
    pair_out_ptr, topk_ids_ptr, out_ptr,  # pair_out [N, H] fp32 (contiguous), topk_ids [N], out [T, H]
    num_tokens, hidden_size, num_experts, stride_om,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, ACC64: tl.constexpr = False,
):
    """out[t] = sum_j pair_out[t * k + j] over slots with a valid expert id, in fp32 (fp64 with ACC64, for a float64
    out) then cast to out's dtype."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    row_ok = tokens < num_tokens
    tokens = tokens.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float64 if ACC64 else tl.float32)
    for j in tl.static_range(TOP_K):
        pairs = tokens * TOP_K + j  # [BT]
        expert = tl.load(topk_ids_ptr + pairs, mask=row_ok, other=-1)
        limit = tl.where((expert >= 0) & (expert < num_experts), hidden_size, 0)  # [BT], 0 skips the slot
        ptrs = pair_out_ptr + pairs[:, None] * hidden_size + offs[None, :]
        acc += tl.load(ptrs, mask=offs[None, :] < limit[:, None], other=0.0).to(acc.dtype)
    o_ptrs = out_ptr + tokens[:, None] * stride_om + offs[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs[None, :] < hidden_size))
