"""bf16/fp16 CPU experts and projections: accuracy vs float64, placement and row invariance of each expert's rows."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.kernels import cpu_gemm, fused_moe_reference, torch_moe
from tests.cpu_kernel_util import buildable_here, needs_kernel

LOWP = (torch.bfloat16, torch.float16)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12))


def experts(num, dtype, hidden=72, inter=40, seed=0):
    """w13 [E, 2I, H], w2 [E, H, I] in dtype (K = 72, 40: vector body and tail)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num, hidden, inter, generator=g) / inter**0.5
    return w13.to(dtype), w2.to(dtype)


def one_per_token(x, w13, w2, ids, strategy="auto"):
    """top-1 routing with weight 1: row t of the fp32 result is expert ids[t] applied to x[t] (-1: zeros)."""
    ids = torch.as_tensor(ids).view(-1, 1)  # [T, 1]
    weights = torch.ones(ids.shape, dtype=torch.float32)  # [T, 1]
    return torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy=strategy, out_dtype=torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", LOWP)
def test_seg_gemm_low_precision_matches_float64(dtype):
    """fp32 sums of exactly widened bf16/fp16 weights: fp32-level error, 0..20 rows per weight, N odd, K % 8 != 0."""
    counts = [0, 1, 3, 4, 0, 9, 16, 20]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    x, w = torch.randn(sum(counts), 77), torch.randn(len(counts), 33, 77).to(dtype)
    out = torch.full((x.shape[0], 33), float("nan"))
    cpu_gemm.seg_gemm(x, w, torch.tensor(starts), torch.tensor(counts), out)
    for e, (s, c) in enumerate(zip(starts, counts)):
        if c:
            assert rel_err(out[s:s + c], x[s:s + c].double() @ w[e].double().T) < 1e-5, (e, c)


@needs_kernel
@pytest.mark.parametrize("dtype", LOWP)
def test_moe_low_precision_sums_and_activations_in_fp32(dtype):
    """Against the float64 loop on the same bf16/fp16 values: fp32-level in fp32 out, one rounding in dtype out."""
    w13, w2 = experts(9, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 72, generator=g).to(dtype)
    ids = torch.rand(37, 9, generator=g).argsort(1)[:, :3]
    ids[5, 1] = -1
    weights = torch.rand(37, 3, generator=g).softmax(-1)
    ref = fused_moe_reference(x.double(), w13.double(), w2.double(), ids, weights.double())  # [T, H] float64
    out32 = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, out_dtype=torch.float32)
    assert rel_err(out32, ref) < 1e-5
    out = torch_moe.fused_moe_torch(x, w13, w2, ids, weights)
    assert out.dtype == dtype and rel_err(out, ref) < (8e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 6, 40, 200])
def test_expert_rows_independent_of_other_experts(tokens, dtype, kernel, monkeypatch):
    """The rows of experts 3 and 7 are the same bits whether the call holds 2, 12 or 80 experts and whatever else the
    batch routes. The sizes are those at which pick_strategy would choose bmm (80 experts, 1 and 6 tokens), grouped
    (12 experts, 200 tokens) or segment: "auto" on CPU must not."""
    if kernel and not buildable_here():
        pytest.skip("the skinny C kernel cannot run here")
    if kernel:  # built, or this case would run torch and pass as the other one
        assert cpu_gemm.available()
    else:
        monkeypatch.setattr(cpu_gemm, "_lib", False)
    w13, w2 = experts(80, dtype, seed=tokens)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 72, generator=g).to(dtype)
    ids = torch.randint(0, 80, (tokens,), generator=g)
    ids[::2] = torch.tensor([3, 7]).repeat(tokens)[: (tokens + 1) // 2]
    mine = (ids == 3) | (ids == 7)  # [T]
    full = one_per_token(x, w13, w2, ids)
    held = [3, 7]
    two = one_per_token(x, w13[held], w2[held], torch.where(ids == 3, 0, torch.where(ids == 7, 1, -1)))
    twelve = list(range(12))
    some = one_per_token(x, w13[twelve], w2[twelve], torch.where(ids < 12, ids, -1))
    for strategy in ("segment", "auto"):
        assert torch.equal(one_per_token(x, w13, w2, ids, strategy)[mine], full[mine])
    assert torch.equal(two[mine], full[mine]) and torch.equal(some[mine], full[mine])
    assert not two[~mine].any()


@needs_kernel
@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_rows_independent_of_row_count(dtype):
    """bf16/fp16 with the kernel: an expert's rows do not depend on how many rows it has (split over replicas)."""
    w13, w2 = experts(4, dtype)
    x = torch.randn(45, 72).to(dtype)
    ids = torch.full((45,), 2)
    whole = one_per_token(x, w13, w2, ids)
    for cut in (1, 4, 17, 30):
        parts = torch.cat((one_per_token(x[:cut], w13, w2, ids[:cut]), one_per_token(x[cut:], w13, w2, ids[cut:])))
        assert torch.equal(parts, whole), cut


@needs_kernel
def test_fp32_rows_independent_of_row_count_up_to_kernel_rows():
    """fp32: row invariance holds up to cpu_gemm.MAX_ROWS rows per expert; longer segments go to MKL, and splitting
    them (over replicas) changes the rows by fp32 rounding only (bound: 1e-5 relative, K = 72 and 40)."""
    w13, w2 = experts(4, torch.float32)
    x = torch.randn(40, 72)
    ids = torch.full((40,), 1)
    n = cpu_gemm.MAX_ROWS
    whole = one_per_token(x[:n], w13, w2, ids[:n])
    assert torch.equal(torch.cat([one_per_token(x[i:i + 1], w13, w2, ids[i:i + 1]) for i in range(n)]), whole)
    long = one_per_token(x, w13, w2, ids)  # 40 rows: MKL
    split = torch.cat((one_per_token(x[:n], w13, w2, ids[:n]), one_per_token(x[n:], w13, w2, ids[n:])))
    assert rel_err(split, long) < 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_maybe_linear_low_precision(dtype, rows):
    """bf16/fp16 projections: fp32 sums + bias, one rounding (matches the float64 product rounded, to 1 ulp), and
    each row's bits independent of the other rows of the batch."""
    x, w, b = torch.randn(rows, 77).to(dtype), (torch.randn(50, 77) / 8).to(dtype), torch.randn(50).to(dtype)
    out = cpu_gemm.maybe_linear(x, w, b)  # [rows, 50]
    ref = x.double() @ w.double().T + b.double()
    assert out.dtype == dtype and rel_err(out, ref) < (8e-3 if dtype == torch.bfloat16 else 1e-3)
    assert torch.equal(torch.cat([cpu_gemm.maybe_linear(x[i:i + 1], w, b) for i in range(rows)]), out)
