"""Block-FP8 experts (DeepSeek-V3 layout): dequantization, the public API's checks and torch fallback, and the
Triton W8A16 / W8A8 kernels under TRITON_INTERPRET=1 in a child process, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.kernels import check_moe_inputs, fused_moe
from elasticmoe.kernels.fp8 import (dequantize_block_fp8, dequantize_w13, fused_moe_fp8_reference,
                                    quantize_act_groups, quantize_block_fp8)

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
