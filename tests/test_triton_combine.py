"""The Triton backend's top-k sum in out_dtype: written as summed, not rounded to hidden's dtype first.

An expert shard on a GPU asks fused_moe for float64 (model.experts.COMBINE_DTYPE) so that the partial sums of
several shards add up as one sum would; the Triton path rounded its fp32 sum to the activations' dtype (bf16) and
widened that, so a token served by two shards was rounded three times. Under TRITON_INTERPRET=1 in a child
process (tests/triton_child.py, fp16: the interpreter refuses bf16) and on CUDA (bf16) where there is one.
"""

from __future__ import annotations

import json
import sys

import torch

from tests.moe_cases import make_inputs, rel_err
from tests.triton_child import child_tests

CHECKS = ["out-dtype-holds-the-unrounded-sum", "shard-partial-sums-add-up", "store-sums-in-float64"]


def _half(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float16


def _out_dtypes(device: str) -> dict:
    """fused_moe(out_dtype=float32 / float64) on 16-bit inputs: the fp32 sum itself (its rounding to the inputs'
    dtype is the default result, bit for bit), and float64 within fp32 rounding of it."""
    from elasticmoe.kernels import fused_moe

    inputs = [t.to(device) for t in make_inputs(37, 8, 2, "skip", dtype=_half(device), hidden=96, inter=64)]
    default = fused_moe(*inputs, backend="triton")
    out32 = fused_moe(*inputs, backend="triton", out_dtype=torch.float32)
    out64 = fused_moe(*inputs, backend="triton", out_dtype=torch.float64)
    widened = out32.to(default.dtype).float()
    unrounded = int((out32 != widened).sum())  # 0 before: out32 was the default result widened
    return {"ok": torch.equal(out32.to(default.dtype), default) and unrounded > out32.numel() // 2
            and out64.dtype == torch.float64 and rel_err(out64.cpu(), out32.cpu()) <= 1e-6,
            "unrounded": unrounded, "of": out32.numel(), "err64": rel_err(out64.cpu(), out32.cpu())}


def _local(ids: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Global ids [T, k] -> a shard's local ids for experts [lo, hi): -1 for the others (as ExpertStore.forward)."""
    return torch.where((ids >= lo) & (ids < hi), ids - lo, -1)


def _split(device: str) -> dict:
    """Experts 0-3 on one shard, 4-7 on another: their float64 partial sums add up to the float64 sum of one shard
    holding all 8 to fp32 rounding (before: each partial was rounded to fp16 / bf16, 4e-4 / 2e-3 off). 8 tokens
    with k = 2: 2 and 4 rows per expert, the same default tiles on both shards."""
    from elasticmoe.kernels import fused_moe

    x, w13, w2, ids, weights = (t.to(device) for t in make_inputs(8, 8, 2, dtype=_half(device), hidden=96, inter=64))
    f64 = dict(backend="triton", out_dtype=torch.float64)
    whole = fused_moe(x, w13, w2, ids, weights, **f64)
    parts = [fused_moe(x, w13[lo:lo + 4], w2[lo:lo + 4], _local(ids, lo, lo + 4), weights, **f64) for lo in (0, 4)]
    err = rel_err((parts[0] + parts[1]).cpu(), whole.cpu())
    return {"ok": err <= 1e-5, "err": err}


def _store(device: str) -> dict:
    """ExpertStore on the triton backend (a tiny model, 16-bit): forward's float64 sum is not its dtype's rounding."""
    import tempfile
    from pathlib import Path

    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore
    from elasticmoe.model.tiny import make_tiny_model

    dtype = _half(device)
    with tempfile.TemporaryDirectory() as tmp:
        files = open_model(str(make_tiny_model("qwen3_moe", Path(tmp) / "m", layers=2, experts=8)))
        store = ExpertStore(files.ckpt, files.names, files.spec, dtype, torch.device(device), backend="triton")
        layer = files.spec.moe.moe_layers[-1]
        store.load([(layer, e) for e in range(files.spec.moe.num_experts)])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, files.spec.hidden_size, generator=g).to(dtype)
    ids = torch.rand(9, files.spec.moe.num_experts, generator=g).argsort(1)[:, :files.spec.moe.top_k]
    weights = torch.rand(9, files.spec.moe.top_k, generator=g)
    out = store.forward(layer, x.to(device), ids.to(device), weights.to(device)).cpu()
    unrounded = int((out != out.to(dtype).double()).sum())
    return {"ok": out.dtype == torch.float64 and unrounded > out.numel() // 2, "unrounded": unrounded,
            "of": out.numel()}


def _child_main(device: str) -> None:
    results = {"out-dtype-holds-the-unrounded-sum": _out_dtypes(device), "shard-partial-sums-add-up": _split(device),
               "store-sums-in-float64": _store(device)}
    print(json.dumps(results))


_combine_interpreted, _combine_cuda, test_triton_combine_interpreted, test_triton_combine_on_cuda = child_tests(
    __file__, "--combine-child", CHECKS)


if __name__ == "__main__" and "--combine-child" in sys.argv:
    _child_main(sys.argv[sys.argv.index("--combine-child") + 1])
