"""Block-FP8 experts (DeepSeek-V3 layout): dequantization, the public API's checks and torch fallback, and the
Triton W8A16 / W8A8 kernels under TRITON_INTERPRET=1 in a child process, against a float64 reference."""

from __future__ import annotations

import sys

import pytest
import torch

from elasticmoe.kernels import check_moe_inputs, fused_moe
from elasticmoe.kernels.fp8 import (dequantize_block_fp8, dequantize_w13, fused_moe_fp8_reference,
                                    quantize_act_groups, quantize_block_fp8)
from tests.triton_child import child_tests

FP8 = torch.float8_e4m3fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def make_fp8_inputs(tokens, experts, top_k, hidden=256, inter=128, dtype=torch.float32, seed=0, split=False):
    """hidden [T, H], fp8 w13 [E, 2I, H] + scale, fp8 w2 [E, H, I] + scale, topk_ids [T, k], topk_weights [T, k].

    Weights quantized the published way (128x128 blocks, scale_inv = amax / 448), each block with its own
    magnitude so that a misplaced scale shows. split: gate and up quantized apart (their scales concatenated).
    """
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w13 *= torch.rand(experts, 2 * inter // 64 + 1, 1, generator=g).repeat_interleave(64, 1)[:, :2 * inter] * 4
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    w2 *= torch.rand(experts, 1, inter // 64 + 1, generator=g).repeat_interleave(64, 2)[:, :, :inter] * 4
    if split:
        (qg, sg), (qu, su) = quantize_block_fp8(w13[:, :inter]), quantize_block_fp8(w13[:, inter:])
        q13, s13 = torch.cat([qg, qu], 1), torch.cat([sg, su], 1)
    else:
        q13, s13 = quantize_block_fp8(w13)
    q2, s2 = quantize_block_fp8(w2)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k]
    ids[torch.rand(tokens, top_k, generator=g) < 0.2] = -1  # experts held elsewhere
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return x, q13, s13, q2, s2, ids, weights


def _ragged_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 300, 200, generator=g) * torch.rand(2, 300, 1, generator=g) * 3  # [2, 300, 200]
    return w, *quantize_block_fp8(w)


def test_dequantize_matches_the_formula():
    """w_real[n, k] = w[n, k] * scale[n // 128, k // 128], ragged edges included."""
    w, q, scale = _ragged_weight()
    assert q.dtype == FP8 and scale.shape == (2, 3, 2) and scale.dtype == torch.float32
    n, k = torch.meshgrid(torch.arange(300), torch.arange(200), indexing="ij")
    by_index = q.float() * scale[:, n // 128, k // 128]  # [2, 300, 200]
    assert torch.equal(dequantize_block_fp8(q, scale), by_index)
    assert rel_err(by_index, w) <= 2**-4  # e4m3: 3 mantissa bits
    assert quantize_block_fp8(torch.zeros(1, 4, 4))[1].eq(1).all()  # an all-zero block keeps scale 1


def test_dequantize_matches_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    _, q, scale = _ragged_weight()
    assert torch.equal(dequantize_block_fp8(q, scale), _dequantize_fp8_weight(q, scale, [128, 128], torch.float32))


def test_split_and_joint_w13_scales():
    """I = 192 (not a multiple of 128): gate/up quantized apart give 2 * ceil(I/128) = 4 scale rows, jointly 3."""
    x, q13, s13, q2, s2, ids, weights = make_fp8_inputs(5, 3, 2, inter=192, split=True)
    assert s13.shape == (3, 4, 2)
    deq = dequantize_w13(q13, s13)  # [E, 2I, H]
    assert torch.equal(deq[:, 192:], dequantize_block_fp8(q13[:, 192:], s13[:, 2:]))
    joint = make_fp8_inputs(5, 3, 2, inter=192)
    assert joint[2].shape == (3, 3, 2)
    for q13_, s13_ in ((q13, s13), joint[1:3]):
        check_moe_inputs(x, q13_, q2, ids, weights, s13_, s2)


def test_ambiguous_w13_scale_layout_needs_split_scales():
    """I = 96, bn = 128: split and joint scales both have 2 rows; the caller says which, and it matters."""
    split = make_fp8_inputs(5, 3, 2, inter=96, split=True)
    joint = make_fp8_inputs(5, 3, 2, inter=96)
    x, q13, s13, q2, s2, ids, weights = split
    assert s13.shape == joint[2].shape == (3, 2, 2)
    with pytest.raises(ValueError, match="pass split_scales=True"):
        fused_moe(x, q13, q2, ids, weights, backend="torch", w13_scale=s13, w2_scale=s2)
    for inputs, flag in ((split, True), (joint, False)):
        x, q13, s13, q2, s2, ids, weights = inputs
        out = fused_moe(x, q13, q2, ids, weights, backend="torch", w13_scale=s13, w2_scale=s2, split_scales=flag)
        ref = fused_moe_fp8_reference(x, q13, q2, ids, weights, s13, s2, split=flag)
        wrong = fused_moe_fp8_reference(x, q13, q2, ids, weights, s13, s2, split=not flag)
        assert rel_err(out, ref) <= 1e-5 and rel_err(wrong, ref) > 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_torch_backend_dequantizes(dtype, tol):
    x, q13, s13, q2, s2, ids, weights = make_fp8_inputs(9, 4, 2, dtype=dtype)
    out = fused_moe(x, q13, q2, ids, weights, backend="torch", w13_scale=s13, w2_scale=s2)
    ref = fused_moe_fp8_reference(x.float(), q13, q2, ids, weights, s13, s2)
    assert out.dtype == dtype and rel_err(out, ref) <= tol
    wide = fused_moe(x, q13, q2, ids, weights, backend="torch", w13_scale=s13, w2_scale=s2, block_shape=(128, 128),
                     out_dtype=torch.float64)
    assert wide.dtype == torch.float64 and rel_err(wide, ref) <= tol


def test_fp8_input_checks_name_the_bad_argument():
    x, q13, s13, q2, s2, ids, weights = make_fp8_inputs(3, 2, 1)
    bad = {
        "both w13_scale and w2_scale": dict(w13_scale=s13),
        "w2_scale .* does not fit block 128x128": dict(w13_scale=s13, w2_scale=s2[:, :1]),
        "w13_scale must be float32": dict(w13_scale=s13.half(), w2_scale=s2),
        "block_shape must be two positive ints": dict(w13_scale=s13, w2_scale=s2, block_shape=(128,)),
        "w13_scale .* does not fit block 64x128": dict(w13_scale=s13, w2_scale=s2, block_shape=(64, 128)),
    }
    for message, kwargs in bad.items():
        with pytest.raises(ValueError, match=message):
            fused_moe(x, q13, q2, ids, weights, backend="torch", **kwargs)
    with pytest.raises(ValueError, match="block scales need float8_e4m3fn w13 and w2"):
        fused_moe(x, q13, q2.float(), ids, weights, w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="are for float8_e4m3fn weights"):
        fused_moe(x, q13.float(), q2.float(), ids, weights, w13_scale=s13, w2_scale=s2)


def test_activation_groups_round_trip():
    x = torch.randn(3, 300) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    x[0, 128:256] = 0
    q = quantize_act_groups(x, 128)
    assert q[0, 128:256].eq(0).all() and rel_err(q, x) <= 2**-4
    assert torch.equal(quantize_act_groups(q, 128), q)  # fp8 values times the same scale stay put


# ----------------------------------------------------------------------------- Triton, interpreted in a child

W8A16_TILES = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
W8A8_TILES = dict(W8A16_TILES, BLOCK_K=128)  # W8A8 quantizes one whole 128-group per K step
TRITON_CASES = {  # name -> (tokens, experts, top_k, inter, split scales, activations, act_quant, tolerance)
    "w8a16-fp32-T33": (33, 4, 2, 128, False, "float32", False, 1e-5),
    "w8a16-fp32-I192-split": (17, 3, 2, 192, True, "float32", False, 1e-5),
    "w8a16-fp32-I96-joint": (9, 3, 2, 96, False, "float32", False, 1e-5),  # a scale block spans gate and up
    "w8a16-fp16-T17": (17, 4, 2, 128, False, "float16", False, 2e-3),
    "w8a8-fp32-T1": (1, 4, 2, 128, False, "float32", True, 1e-5),
    "w8a8-fp32-T33": (33, 4, 2, 128, False, "float32", True, 1e-5),
    "w8a8-fp32-I192-split": (17, 3, 2, 192, True, "float32", True, 1e-5),
    "w8a8-fp16-T17": (17, 4, 2, 128, False, "float16", True, 2e-3),
    # fp32 holding bf16 values, as a model's activations: amax / 448 must round exactly, or the many exact e4m3
    # ties among such values round the other way (a scale 1 ulp off moves this case by 1.2%)
    "w8a8-bf16values-T64": (64, 4, 2, 128, False, "bf16values", True, 1e-5),
}
CHILD_CHECKS = ["e4m3-rounding", "api-default-tiles-and-warmup", "w8a8-tiles-checked", "w8a16-block-64x96",
                "w8a8-block-64x96"]


def _reference(inputs, act_quant: bool = False, split: bool | None = None) -> torch.Tensor:
    """fused_moe_fp8_reference of make_fp8_inputs' tuple (CPU tensors)."""
    x, q13, s13, q2, s2, ids, weights = inputs
    return fused_moe_fp8_reference(x, q13, q2, ids, weights, s13, s2, act_quant=act_quant, split=split)


def _child_main(device: str) -> None:
    """Every fp8 Triton case (interpreter on CPU; real kernels on CUDA, bf16 in place of fp16); print JSON last."""
    import json

    from elasticmoe.kernels.triton_moe import fused_moe_triton

    results = {}
    for name, (tokens, experts, top_k, inter, split, dtype, act_quant, tol) in TRITON_CASES.items():
        if device == "cuda" and dtype == "float16":
            dtype, tol = "bfloat16", 1e-2
        inputs = make_fp8_inputs(tokens, experts, top_k, inter=inter, split=split,
                                 dtype=torch.bfloat16 if dtype == "bf16values" else getattr(torch, dtype))
        if dtype == "bf16values":
            inputs = (inputs[0].float(), *inputs[1:])
        x, q13, s13, q2, s2, ids, weights = (t.to(device) for t in inputs)
        fp8 = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128), act_quant=act_quant, split=split)
        out = fused_moe_triton(x, q13, q2, ids, weights, config=W8A8_TILES if act_quant else W8A16_TILES, fp8=fp8)
        ref, plain = _reference(inputs, act_quant, split), _reference(inputs, split=split)  # plain: W8A16
        errs = {"vs_ref": rel_err(out.cpu(), ref), "vs_w8a16_ref": rel_err(out.cpu(), plain), "dtype": str(out.dtype)}
        results[name] = {**errs, "ok": errs["vs_ref"] <= tol and out.dtype == x.dtype}
    results["e4m3-rounding"] = _child_rounding(device)
    results.update(_child_api(device))
    print(json.dumps(results))


def _child_rounding(device: str) -> dict:
    """The kernel's fp32 -> e4m3 rounding equals torch's cast: every fp8 value, every midpoint, a dense sweep."""
    import triton

    cast_kernel = globals()["cast_kernel"]  # defined at module level by the child (the interpreter needs a global)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].sort().values  # all 253 finite values (two zeros)
    sweeps = [torch.linspace(-448, 448, 20001), torch.linspace(-0.05, 0.05, 2001)]
    x = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, *sweeps])
    out = torch.empty(x.shape, dtype=FP8, device=device)
    cast_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), out, x.numel(), BLOCK=1024)
    bad = (out.cpu().float() != x.to(FP8).float()).sum().item()  # -0 and +0 compare equal
    return {"ok": bad == 0, "mismatches": bad, "values": x.numel()}


def _child_api(device: str) -> dict:
    """fused_moe on the triton backend with default tiles, warmup_moe for fp8 weights, W8A8 tile check."""
    from elasticmoe.kernels import warmup_moe
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    inputs = make_fp8_inputs(5, 4, 2, dtype=torch.float32)
    ref = _reference(inputs)
    x, q13, s13, q2, s2, ids, weights = (t.to(device) for t in inputs)
    out = fused_moe(x, q13, q2, ids.int(), weights, backend="triton", w13_scale=s13, w2_scale=s2)
    runs = warmup_moe(q13, q2, 2, "triton", torch.float32, w13_scale=s13, w2_scale=s2, act_quant=True)
    again = warmup_moe(q13, q2, 2, "triton", torch.float32, w13_scale=s13, w2_scale=s2, act_quant=True)
    try:
        fp8 = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128), act_quant=True)
        fused_moe_triton(x, q13, q2, ids, weights, config=W8A16_TILES, fp8=fp8)
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    err = rel_err(out.cpu(), ref)
    # a scale block bk that is no power of two (96): default tiles take BLOCK_K = 32, a power of two dividing it
    x, *_, ids, weights = make_fp8_inputs(9, 3, 2, hidden=192, inter=96)
    w13 = torch.randn(3, 192, 192, generator=torch.Generator().manual_seed(1)) / 14  # [E, 2I, H]
    w2 = torch.randn(3, 192, 96, generator=torch.Generator().manual_seed(2)) / 10  # [E, H, I]
    (q13, s13), (q2, s2) = quantize_block_fp8(w13, (64, 96)), quantize_block_fp8(w2, (64, 96))
    act = torch.bfloat16 if device == "cuda" else torch.float16
    ref96 = fused_moe_fp8_reference(x.to(act), q13, q2, ids, weights, s13, s2, (64, 96))
    try:
        out96 = fused_moe(x.to(act).to(device), q13.to(device), q2.to(device), ids.to(device), weights.to(device),
                          backend="triton", w13_scale=s13.to(device), w2_scale=s2.to(device), block_shape=(64, 96))
        err96 = rel_err(out96.cpu(), ref96)
    except ValueError as exc:
        err96 = str(exc)
    ok96 = isinstance(err96, float) and err96 <= (1e-2 if device == "cuda" else 2e-3)
    return {"w8a16-block-64x96": {"ok": ok96, "err": err96}, "w8a8-block-64x96": _child_w8a8_block96(device),
            "api-default-tiles-and-warmup": {"ok": err <= 1e-5 and runs > 0 and again == 0,
                                             "err": err, "runs": runs, "again": again},
            "w8a8-tiles-checked": {"ok": "BLOCK_K == 128" in refused, "message": refused}}


def _child_w8a8_block96(device: str) -> dict:
    """W8A8 with a scale block bk = 96 (no power of two): activations quantized per 96-column group, as the
    reference does, with H = 176 and I = 112 ending in partial groups; column magnitudes vary within each group
    so that a per-tile (32-column) amax shows. Was refused (BLOCK_K must equal 96, a tile width Triton lacks)."""
    g = torch.Generator().manual_seed(3)
    x, *_, ids, weights = make_fp8_inputs(9, 3, 2, hidden=176, inter=112)
    x = x * torch.rand(176, generator=g).repeat_interleave(16)[:176] * 4  # [T, H], uneven within a group
    w13 = torch.randn(3, 224, 176, generator=g) / 13  # [E, 2I, H]
    w2 = torch.randn(3, 176, 112, generator=g) / 11  # [E, H, I]
    (q13, s13), (q2, s2) = quantize_block_fp8(w13, (64, 96)), quantize_block_fp8(w2, (64, 96))
    act = torch.bfloat16 if device == "cuda" else torch.float32
    ref = fused_moe_fp8_reference(x.to(act), q13, q2, ids, weights, s13, s2, (64, 96), act_quant=True, split=False)
    try:
        out = fused_moe(x.to(act).to(device), q13.to(device), q2.to(device), ids.to(device), weights.to(device),
                        backend="triton", w13_scale=s13.to(device), w2_scale=s2.to(device), block_shape=(64, 96),
                        act_quant=True, split_scales=False)
        err = rel_err(out.cpu(), ref)
    except ValueError as exc:
        err = str(exc)
    return {"ok": isinstance(err, float) and err <= (1e-2 if device == "cuda" else 1e-5), "err": err}


_fp8_interpreted, _fp8_cuda, test_triton_fp8_interpreted, test_triton_fp8_on_cuda = child_tests(
    __file__, "--fp8-child", list(TRITON_CASES) + CHILD_CHECKS)


if __name__ == "__main__" and "--fp8-child" in sys.argv:
    import triton
    import triton.language as tl

    from elasticmoe.kernels.triton_gemm import _round_e4m3

    @triton.jit
    def cast_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, _round_e4m3(v).to(tl.float8e4nv), mask=offs < n)

    _child_main(sys.argv[sys.argv.index("--fp8-child") + 1])
