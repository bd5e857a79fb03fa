"""Benchmark the fused MoE kernels vs torch/transformers baselines; writes benchmarks/results/kernels-<device>.json.

GPU:  python benchmarks/kernels.py                 (bf16; Mixtral, Qwen3-30B-A3B, DeepSeek-V3 shard)
CPU:  python benchmarks/kernels.py --smoke         (tiny shapes, fp32, Triton via TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODELS = {  # name -> (E, H, I, k)
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "deepseek-v3-shard": (32, 7168, 2048, 8),
}
TOKENS = [1, 16, 64, 256, 1024, 4096]
SMOKE_MODELS = {"smoke": (8, 64, 96, 2)}
SMOKE_TOKENS = [1, 16]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU (Triton interpreter)")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    p.add_argument("--tokens", nargs="*", type=int, default=None)
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (smoke default)")
    p.add_argument("--gather-budget-gb", type=float, default=8.0,
                   help="skip baselines that would materialise more gathered weights than this")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    return p.parse_args()


# ----------------------------------------------------------------------------- timing and peaks


def time_us(fn, device: torch.device) -> float:
    """Median runtime in microseconds (triton do_bench with L2 flush on CUDA, best-of on CPU)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e6


def measure_peaks(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and dense matmul throughput (TFLOP/s)."""
    n_bytes = (1 << 24) if smoke else (1 << 31)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device)
    size = 256 if smoke else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    mm_us = time_us(lambda: a @ b, device)
    del src, dst
    return {"bandwidth_gbs": 2 * n_bytes / copy_us / 1e3, "matmul_tflops": 2 * size**3 / mm_us / 1e6}


# ----------------------------------------------------------------------------- implementations


def loop_moe(x, w13, w2, ids, weights):
    """Naive per-expert loop (torch.where per expert, one host sync each), fp32 top-k sum."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        gate_up = x[tok] @ w13[e].t()  # [c, 2I]
        y = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w2[e].t()  # [c, H]
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out.to(x.dtype)


def hf_experts(w13, w2, top_k):
    """transformers' experts module (Mixtral layout) or None; its config picks the implementation."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    except ImportError:
        return None
    num_experts, two_i, hidden = w13.shape
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=two_i // 2, num_local_experts=num_experts,
                        num_experts_per_tok=top_k)
    with torch.device("meta"):
        module = MixtralExperts(cfg)
    module.gate_up_proj = torch.nn.Parameter(w13, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module


def implementations(w13, w2, top_k, num_pairs, budget_gb) -> dict:
    """name -> fn(x, ids, weights) or a string saying why it is skipped."""
    from elasticmoe.kernels import fused_moe
    from elasticmoe.kernels.torch_moe import fused_moe_torch

    impls = {
        "elasticmoe-triton": lambda x, i, w: fused_moe(x, w13, w2, i, w, backend="triton"),
        "elasticmoe-torch": lambda x, i, w: fused_moe(x, w13, w2, i, w, backend="torch"),
        "per-expert-loop": lambda x, i, w: loop_moe(x, w13, w2, i, w),
    }
    if hasattr(torch.nn.functional, "grouped_mm"):
        impls["torch-grouped_mm"] = lambda x, i, w: fused_moe_torch(x, w13, w2, i, w, strategy="grouped")
    else:
        impls["torch-grouped_mm"] = "torch.nn.functional.grouped_mm not in this torch"
    module = hf_experts(w13, w2, top_k)
    gathered_gb = num_pairs * (w13[0].numel() + w2[0].numel()) * w13.element_size() / 1e9
    for name in ("eager", "batched_mm", "grouped_mm"):
        if module is None:
            impls[f"hf-{name}"] = "transformers not importable"
        elif name == "batched_mm" and gathered_gb > budget_gb:
            impls[f"hf-{name}"] = f"skipped: would gather {gathered_gb:.0f} GB of expert weights"
        else:
            impls[f"hf-{name}"] = _hf_call(module, name)
    return impls


def _hf_call(module, name):
    def run(x, ids, weights):
        module.config._experts_implementation = name
        return module(x, ids, weights)

    return run


# ----------------------------------------------------------------------------- one model


def make_case(shape, tokens, dtype, device, seed=0):
    """Random weights (scaled like trained ones) and softmax-top-k routing for `tokens` tokens."""
    num_experts, hidden, inter, top_k = shape
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g, device=device) / inter**0.5).to(dtype)
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    logits = torch.randn(tokens, num_experts, generator=g, device=device)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, w13, w2, ids, weights / weights.sum(-1, keepdim=True)


def bench_model(name, shape, tokens_list, dtype, device, peaks, args) -> list[dict]:
    from elasticmoe.kernels import fused_moe_reference
    from elasticmoe.kernels.torch_moe import fused_moe_torch

    rows = []
    num_experts, hidden, inter, top_k = shape
    for tokens in tokens_list:
        x, w13, w2, ids, weights = make_case(shape, tokens, dtype, device)
        w13_32, w2_32 = w13.float(), w2.float()
        ref = fused_moe_torch(x.float(), w13_32, w2_32, ids, weights, strategy="segment")  # fp32 reference
        if tokens <= 16:  # the fp32 reference itself against the float64 loop
            assert _rel(ref, fused_moe_reference(x.float(), w13_32, w2_32, ids, weights)) < 1e-5
        del w13_32, w2_32
        hit = torch.unique(ids).numel()
        flops = 6 * tokens * top_k * hidden * inter
        n_bytes = hit * 3 * hidden * inter * w13.element_size() + 2 * tokens * hidden * x.element_size()
        impls = implementations(w13, w2, top_k, tokens * top_k, args.gather_budget_gb)
        for impl, fn in impls.items():
            row = {"model": name, "tokens": tokens, "impl": impl, "experts_hit": hit}
            rows.append(row)
            if isinstance(fn, str):
                row["note"] = fn
                continue
            row.update(_measure(fn, x, ids, weights, ref, dtype, device))
            if "us" in row:
                row["tflops"] = flops / row["us"] / 1e6
                row["gbs"] = n_bytes / row["us"] / 1e3
                row["pct_peak_flops"] = 100 * row["tflops"] / peaks["matmul_tflops"]
                row["pct_peak_bw"] = 100 * row["gbs"] / peaks["bandwidth_gbs"]
            print(_format(row), flush=True)
        del x, w13, w2, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure(fn, x, ids, weights, ref, dtype, device) -> dict:
    """Check against the fp32 reference, then time. Errors become a note instead of a crash."""
    try:
        with torch.no_grad():
            err = _rel(fn(x, ids, weights), ref)
            if err > TOLERANCE[dtype]:
                return {"err": err, "note": f"WRONG: rel err {err:.2e} > {TOLERANCE[dtype]:.0e}, not timed"}
            return {"err": err, "us": time_us(lambda: fn(x, ids, weights), device)}
    except Exception as exc:  # noqa: BLE001  OOM, unsupported dtype/arch, Triton out of resources
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _format(row: dict) -> str:
    head = f"{row['model']:>18} {row['tokens']:>5} {row['impl']:>18}"
    if "us" not in row:
        return f"{head}  {row.get('note', '')}"
    return (f"{head} {row['us']:>10.1f} {row['tflops']:>8.2f} {row['gbs']:>8.0f}"
            f" {row['pct_peak_flops']:>6.1f}% {row['pct_peak_bw']:>6.1f}%  err {row['err']:.1e}")


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for pkg in ("torch", "triton", "transformers"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if not args.smoke:
            sys.exit("no CUDA device: run with --smoke for the CPU plumbing check")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from elasticmoe.kernels.tuning import device_name

    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in (args.models or MODELS)}
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    peaks = measure_peaks(device, dtype, args.smoke)
    print(f"device {device_name(device)}  dtype {dtype}  peak copy {peaks['bandwidth_gbs']:.0f} GB/s"
          f"  peak matmul {peaks['matmul_tflops']:.3g} TFLOP/s")
    print(f"{'model':>18} {'T':>5} {'impl':>18} {'us':>10} {'TFLOP/s':>8} {'GB/s':>8} {'%FLOP':>7} {'%BW':>7}")
    rows = []
    for name, shape in models.items():
        rows += bench_model(name, shape, tokens, dtype, device, peaks, args)
    suffix = "-smoke" if args.smoke else ""
    out = Path(args.out or REPO / "benchmarks" / "results" / f"kernels-{device_name(device)}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "dtype": str(dtype), "versions": _versions(), "peaks": peaks,
            "bytes": "weights of the experts hit + input and output activations",
            "flops": "6 * T * k * H * I (gate, up, down GEMMs)"}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
