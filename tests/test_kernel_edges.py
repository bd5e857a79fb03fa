"""MoE kernels at a deployment's edges, in-process: the torch path (every strategy, with and without the skinny C
kernel), the entry points' input checks and alignment. The Triton twins of these cases: tests/test_triton_edges.py;
cpu_gemm's operand checks: tests/test_cpu_gemm.py; the tuning table's lookup: tests/test_tuning_edges.py."""

from __future__ import annotations

import re

import pytest
import torch

from elasticmoe.kernels import cpu_gemm, fused_moe, fused_moe_reference, torch_moe
from elasticmoe.kernels.align import align_block_size_torch
from elasticmoe.kernels.fp8 import fused_moe_fp8_reference, quantize_block_fp8
from tests.moe_cases import TOL_FP16, TOL_FP32, make_inputs, rel_err


def _dup_zero(tokens=7, experts=4, dtype=torch.float32, **kw):
    x, w13, w2, ids, weights = make_inputs(tokens, experts, 3, dtype=dtype, **kw)
    ids[:, 1] = ids[:, 0]  # one expert twice in each token's top-k
    ids[2] = experts - 1  # three times
    weights[1] = 0.0  # a token whose weights are all zero
    weights[3, 0] = 0.0
    return x, w13, w2, ids, weights


def _out_of_range():
    x, w13, w2, ids, weights = make_inputs(6, 3, 2)
    ids[0, 0], ids[1, 1], ids[2, 0], ids[3] = 3, -7, 2**40, -1  # E, below -1, far past int32, all routed away
    return x, w13, w2, ids, weights


def _one_expert_twice():
    x, w13, w2, _, weights = make_inputs(5, 1, 1)
    ids = torch.zeros(5, 2, dtype=torch.int64)  # a shard holding one expert, named twice by each token
    ids[1, 1] = -1
    return x, w13, w2, ids, torch.rand(5, 2)


def _strided():
    x, w13, w2, ids, weights = make_inputs(8, 4, 2, "skip")
    wide = lambda t: torch.cat([t, t], -1)[..., : t.shape[-1]]  # noqa: E731  unit last stride, wider rows
    return wide(x), wide(w13), wide(w2), torch.cat([ids, ids], 1)[:, ::2], weights.t().contiguous().t()


def _row_offsets():
    """Storage offsets: tokens 5..10 of a batch, experts 1.. of a layer (ids shifted to match)."""
    x, w13, w2, ids, weights = make_inputs(20, 4, 2, "skip")
    return x[5:11], w13[1:], w2[1:], (ids[5:11] - 1).clamp(min=-1), weights[5:11]


def _beside_a_bad_expert(dtype=torch.float32):
    """No token routes to expert 0, whose products are NaN (fp32) or past fp16's range; some slots are -1."""
    x, w13, w2, ids, weights = make_inputs(6, 4, 2, "skip", dtype=dtype)
    ids[ids == 0] = -1
    w13[0] = float("nan") if dtype == torch.float32 else 1e4
    return x, w13, w2, ids, weights


EDGE_CASES = {  # name -> (inputs, tolerance)
    "T0": (lambda: make_inputs(0, 3, 2), TOL_FP32),
    "T1-k4-of-E4": (lambda: make_inputs(1, 4, 4), TOL_FP32),
    "T3-k4-of-E4-fp16": (lambda: make_inputs(3, 4, 4, dtype=torch.float16), TOL_FP16),
    "k0": (lambda: make_inputs(3, 4, 0), TOL_FP32),
    "one-expert-shard": (lambda: make_inputs(6, 1, 1, "skip"), TOL_FP32),
    "one-expert-k2-same-id": (_one_expert_twice, TOL_FP32),
    "no-experts-held": (lambda: (lambda x, a, b, i, w: (x, a[:0], b[:0], i * 0 - 1, w))(*make_inputs(4, 3, 2)),
                        TOL_FP32),
    "duplicate-ids-zero-weights": (_dup_zero, TOL_FP32),
    "duplicate-ids-fp16": (lambda: _dup_zero(dtype=torch.float16), TOL_FP16),
    "ids-out-of-range": (_out_of_range, TOL_FP32),
    "H136-I200": (lambda: make_inputs(5, 3, 2, "skip", hidden=136, inter=200), TOL_FP32),
    "H200-I136-fp16": (lambda: make_inputs(5, 3, 2, "skip", torch.float16, hidden=200, inter=136), TOL_FP16),
    "H2880-I1408-T1": (lambda: make_inputs(1, 1, 1, hidden=2880, inter=1408), TOL_FP32),
    "non-contiguous": (_strided, TOL_FP32),
    "row-offset-views": (_row_offsets, TOL_FP32),
    "topk-weights-bf16-hidden-fp32": (lambda: (lambda x, a, b, i, w: (x, a, b, i, w.bfloat16()))(
        *make_inputs(7, 4, 3, "skip")), TOL_FP32),
    "topk-weights-fp32-hidden-fp16": (lambda: make_inputs(7, 4, 3, "skip", dtype=torch.float16), TOL_FP16),
    "skips-beside-a-nan-expert": (_beside_a_bad_expert, TOL_FP32),
    "skips-beside-an-overflowing-expert-fp16": (lambda: _beside_a_bad_expert(torch.float16), TOL_FP16),
}


@pytest.mark.parametrize("kernel", [True, False], ids=["C-kernel", "torch-only"])
@pytest.mark.parametrize("strategy", torch_moe.STRATEGIES)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_torch_path_edges(case, strategy, kernel, monkeypatch):
    """Every strategy against the float64 loop. "bmm" indexed w13[0] for E = 0 (IndexError) when called directly, and
    ran a -1 slot through expert 0 times weight 0, so that expert's NaN or inf (0 * inf) reached tokens it never
    served (the skips-beside-* cases; "bmm" is what "auto" picks for decode on CUDA's torch fallback)."""
    if not kernel:
        monkeypatch.setattr(cpu_gemm, "_lib", False)
    build, tol = EDGE_CASES[case]
    x, w13, w2, ids, weights = build()
    out = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy=strategy)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= tol


def _token_2_off(dtype):
    """Token 2 routed with a NaN in its hidden (fp32), or (fp16) gate and up products ~1000, past 65504 together."""
    x, w13, w2, ids, weights = make_inputs(6, 4, 2, "skip", dtype=dtype)
    ids[2, 0] = 1
    if dtype == torch.float32:
        x[2, 3] = float("nan")
        return x, w13, w2, ids, weights
    x[2] *= 1000
    return x, w13, w2 / 1000, ids, weights  # w2 / 1000: the float64 loop's output is finite


@pytest.mark.parametrize("kernel", [True, False], ids=["C-kernel", "torch-only"])
@pytest.mark.parametrize("strategy", torch_moe.STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_non_finite_token_stays_in_its_row(dtype, strategy, kernel, monkeypatch):
    """Token 2's NaN, or its fp16 overflow, leaves the other tokens' results the float64 loop's (the Triton twin:
    test_triton_edges.py)."""
    if not kernel:
        monkeypatch.setattr(cpu_gemm, "_lib", False)
    x, w13, w2, ids, weights = _token_2_off(dtype)
    out = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy=strategy)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    rest = torch.arange(6) != 2
    assert rel_err(out[rest], ref[rest]) <= (TOL_FP32 if dtype == torch.float32 else TOL_FP16)
    assert dtype == torch.float16 or (out[2].isnan().all() and ref[2].isnan().all())  # fp16: as KERNELS.md says


@pytest.mark.skipif(not cpu_gemm.available(), reason="needs the C kernel (x86-64 AVX2, a C compiler)")
def test_fp16_activations_past_65504_stay_finite_in_the_c_kernel():
    """The C kernel keeps silu(gate) * up in fp32, so a token whose fp16 products overflow gets the float64
    loop's finite result on CPU (the Triton kernels store them in fp16: inf, benchmarks/KERNELS.md)."""
    x, w13, w2, ids, weights = _token_2_off(torch.float16)
    out = fused_moe(x, w13, w2, ids, weights, backend="torch")
    assert rel_err(out, fused_moe_reference(x, w13, w2, ids, weights)) <= TOL_FP16


def test_fp8_torch_path_edges():
    """Block-FP8 experts with H = 200, I = 136 (partial 128x128 scale blocks), duplicate ids, zero weights, T = 1."""
    g = torch.Generator().manual_seed(5)
    w13, w2 = torch.randn(4, 272, 200, generator=g) / 14, torch.randn(4, 200, 136, generator=g) / 12
    (q13, s13), (q2, s2) = quantize_block_fp8(w13), quantize_block_fp8(w2)
    x, _, _, ids, weights = _dup_zero(hidden=200, inter=136)
    for rows in (slice(None), slice(0, 1)):
        args = (x[rows], q13, q2, ids[rows], weights[rows])
        out = fused_moe(*args, backend="torch", w13_scale=s13, w2_scale=s2)
        assert rel_err(out, fused_moe_fp8_reference(*args, s13, s2)) <= 1e-5


def test_direct_entry_points_check_inputs():
    """fused_moe_torch called directly took a topk_weights [T, k + 1] beside topk_ids [T, k] and weighted pairs with
    the wrong entries (p = t * k + j read off the wider rows); bad shapes failed deep in torch.mm. Each is now a
    ValueError naming the argument, as fused_moe's."""
    x, w13, w2, ids, weights = make_inputs(4, 3, 2)
    wide = torch.rand(4, 3)
    bad = {  # message fragment -> arguments
        "topk_weights (4, 3) must have topk_ids' shape (4, 2)": (x, w13, w2, ids, wide),
        "hidden must be 2-D [T, H], got shape (4, 40, 1)": (x[..., None], w13, w2, ids, weights),
        "w13 must be 3-D [E, 2I, H]": (x, w13[0], w2, ids, weights),
        "w2 must be 3-D [E, H, I]": (x, w13, w2[0], ids, weights),
        "topk_ids must be 2-D [T, k]": (x, w13, w2, ids.reshape(-1), weights),
        "w13 (3, 47, 40) must be [E, 2I, H] (gate rows, then up rows): dim 1 is odd": (x, w13[:, :47], w2, ids,
                                                                                       weights),
        "w2 (2, 40, 24) does not match w13 (3, 48, 40)": (x, w13, w2[:2], ids, weights),
        "w13 (3, 48, 32) does not match hidden (4, 40)": (x, w13[..., :32], w2, ids, weights),
        "topk_ids (3, 2) must be [T, k] with T = 4": (x, w13, w2, ids[:3], weights[:3]),
    }
    for fragment, args in bad.items():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            torch_moe.fused_moe_torch(*args)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            fused_moe(*args, backend="torch")


def test_torch_alignment_edges():
    """E = 0 (every pair skipped): num_tokens_post_padded came back empty, [0], not [1]; bad arguments are named."""
    ids = torch.tensor([[0, -1], [1, 1]])
    sorted_ids, expert_ids, num_post = align_block_size_torch(ids, 0, 16)
    assert num_post.tolist() == [0] and expert_ids.tolist() == [-1] and (sorted_ids == 4).all()
    empty = align_block_size_torch(torch.zeros(0, 2, dtype=torch.int64), 4, 16)
    assert [t.numel() for t in empty] == [0, 0, 1] and empty[2].item() == 0
    dup = align_block_size_torch(torch.tensor([[2, 2, 2], [2, -1, 0]]), 3, 16)  # duplicates keep pair order
    assert dup[0][:16].tolist() == [5] + [6] * 15 and dup[0][16:20].tolist() == [0, 1, 2, 3] and dup[2].item() == 32
    for fragment, args in {"topk_ids must hold integer": (ids.float(), 2, 16), "num_experts must be an int >= 0":
                           (ids, -1, 16), "block_m must be an int >= 1": (ids, 2, 0)}.items():
        with pytest.raises(ValueError, match=fragment):
            align_block_size_torch(*args)


@pytest.mark.parametrize("tokens", [0, 3])
def test_unknown_backend_refused_whatever_the_batch(tokens, monkeypatch):
    """fused_moe returned zeros for T = 0 (and k = 0, E = 0) before reading `backend` or ELASTICMOE_MOE_BACKEND, so a
    misspelt backend went unnoticed while nothing was routed to the shard (and forever on one holding no experts).
    Now the same ValueError naming it whatever the batch."""
    x, w13, w2, ids, weights = make_inputs(tokens, 3, 2)
    monkeypatch.delenv("ELASTICMOE_MOE_BACKEND", raising=False)
    with pytest.raises(ValueError, match="unknown MoE backend 'trition'"):
        fused_moe(x, w13, w2, ids, weights, backend="trition")
    with pytest.raises(ValueError, match="unknown MoE backend 'trition'"):
        fused_moe(x, w13[:0], w2[:0], ids, weights, backend="trition")  # no experts held
    monkeypatch.setenv("ELASTICMOE_MOE_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ELASTICMOE_MOE_BACKEND='cuda'"):
        fused_moe(x, w13, w2, ids, weights)
    monkeypatch.setenv("ELASTICMOE_MOE_BACKEND", "torch")
    assert rel_err(fused_moe(x, w13, w2, ids, weights), fused_moe_reference(x, w13, w2, ids, weights)) <= TOL_FP32


@pytest.mark.parametrize("tokens", [0, 3])
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int64, torch.float8_e4m3fn, "float32"])
def test_out_dtype_other_than_a_float_refused(tokens, out_dtype):
    """out_dtype was never checked: an int one truncated the result silently (float8: 3 mantissa bits, a string
    failed in torch). Now a ValueError naming it, from fused_moe and fused_moe_torch, whatever the batch."""
    x, w13, w2, ids, weights = make_inputs(tokens, 3, 2)
    want = f"out_dtype must be None (hidden's dtype), float32, float16, bfloat16 or float64, got {out_dtype!r}"
    with pytest.raises(ValueError, match=re.escape(want)):
        fused_moe(x, w13, w2, ids, weights, backend="torch", out_dtype=out_dtype)
    with pytest.raises(ValueError, match=re.escape(want)):
        torch_moe.fused_moe_torch(x, w13, w2, ids, weights, out_dtype=out_dtype)


@pytest.mark.parametrize("top_k", [0, -1, True, 2.0])
def test_warmup_top_k_refused_whatever_the_backend(top_k):
    """warmup_moe(top_k=0) was a ZeroDivisionError on the Triton backend (tests/test_triton_edges.py) and passed on
    the torch one; now a ValueError naming top_k on both (a config error shows on a CPU test as on the GPU)."""
    from elasticmoe.kernels import warmup_moe

    _, w13, w2, _, _ = make_inputs(1, 3, 2)
    with pytest.raises(ValueError, match=re.escape(f"top_k must be an int >= 1, got {top_k!r}")):
        warmup_moe(w13, w2, top_k, backend="torch")
