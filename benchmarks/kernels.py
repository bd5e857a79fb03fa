"""Benchmark the fused MoE kernels against vLLM / torch._grouped_mm; writes benchmarks/results/kernels-<gpu>.json.

GPU:  python benchmarks/kernels.py               (bf16; Mixtral, Qwen3-30B-A3B, DeepSeek-V3 EP8 shard and E=256)
      python benchmarks/kernels.py --dry-run     (no GPU needed: the cases, routing and byte counts only)
CPU:  python benchmarks/kernels.py --smoke       (tiny shapes, fp32, Triton via TRITON_INTERPRET=1)
Each row: median us with triton's do_bench (L2 flushed, single launches) and with do_bench_cudagraph (CUDA
graph replay, like vLLM's benchmark_moe.py), per-kernel split of ours, and achieved bandwidth.
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

# name -> (E routed over, H, I, k, E held: experts [0, E_local) are local, the rest map to -1)
MODELS = {
    "mixtral-8x7b": (8, 4096, 14336, 2, 8),
    "qwen3-30b-a3b": (128, 2048, 768, 8, 128),
    "deepseek-v3-ep8": (256, 7168, 2048, 8, 32),  # one EP8 shard: ~1/8 of the slots are local
    "deepseek-v3-e256": (256, 7168, 2048, 8, 256),  # w13 holds 7.5e9 > 2^31 elements
}
TOKENS = [1, 16, 64, 256, 1024, 4096]
SMOKE_MODELS = {"smoke": (16, 64, 96, 2, 8)}
SMOKE_TOKENS = [1, 16]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
CPU_RUNS = [3]  # time_us's timed runs on CPU (main sets it from --cpu-runs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU (Triton interpreter)")
    p.add_argument("--dry-run", action="store_true", help="print cases, routing and byte counts; no timing")
    p.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    p.add_argument("--tokens", nargs="*", type=int, default=None)
    p.add_argument("--cpu-runs", type=int, default=3, help="CPU (smoke): timed runs after the warm-up, best kept")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) | float16 | float32 (smoke default)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- routing and bytes


def route(tokens: int, shape, device, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k over all E experts -> (global ids [T, k], local ids [T, k] (-1 off-shard), weights [T, k])."""
    num_experts, _, _, top_k, local = shape
    logits = torch.randn(tokens, num_experts, generator=generator, device=device)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    local_ids = torch.where(ids < local, ids, -1)  # this shard holds experts [0, local)
    return ids, local_ids, weights / weights.sum(-1, keepdim=True)


def bytes_moved(shape, tokens: int, local_ids: torch.Tensor, elem: int, block_m: int = 16) -> dict:
    """Bytes of one forward: "min" = what any implementation must move, "ours" = every byte our pipeline moves.

    min:  weights of the local experts hit (3 * H * I each), x read, out written, ids (8 B) + weights (4 B).
    ours: min + x rows gathered per valid slot + act [padded, I] written and read + fp32 pair_out [N, H]
          written and read + alignment (ids read twice, counts [C, E_P2] written, scanned and read, sorted
          ids written and read twice, expert ids).
    """
    _, hidden, inter, top_k, local = shape
    valid = local_ids[local_ids >= 0]
    counts = torch.bincount(valid.flatten().long(), minlength=local) if valid.numel() else torch.zeros(local)
    hit = int((counts > 0).sum())
    padded = int(((counts + block_m - 1) // block_m * block_m).sum())
    n_pairs, n_valid = tokens * top_k, int(valid.numel())
    minimum = hit * 3 * hidden * inter * elem + 2 * tokens * hidden * elem + n_pairs * 12
    e_p2 = max(1 << local.bit_length(), 16)
    align = n_pairs * 8 * 2 + 3 * (-(-n_pairs // 64)) * e_p2 * 4 + padded * 4 * 3 + padded // block_m * 4 * 2
    extra = n_valid * hidden * elem + 2 * padded * inter * elem + 2 * n_valid * hidden * 4 + align
    return {"min": minimum, "ours": minimum + extra, "experts_hit": hit, "padded_rows": padded}


# ----------------------------------------------------------------------------- timing and peaks


def time_us(fn, device: torch.device, graph: bool = False) -> float:
    """Median us: triton do_bench (L2 flushed) or do_bench_cudagraph on CUDA; best of CPU_RUNS (3) on CPU."""
    if device.type == "cuda":
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    fn()
    times = []
    for _ in range(CPU_RUNS[0]):
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


def grouped_mm_only(x, w13, w2, local_ids):
    """torch._grouped_mm alone: rows pre-sorted by expert outside the timed call (no routing, no reduce)."""
    flat = local_ids.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, w13.shape[0]), stable=True)[: int((flat >= 0).sum())]
    rows = x[order // local_ids.shape[1]].contiguous()  # [N_valid, H]
    offs = torch.bincount(flat[flat >= 0].long(), minlength=w13.shape[0]).cumsum(0).to(torch.int32)  # [E]
    w13_t, w2_t, inter = w13.transpose(1, 2), w2.transpose(1, 2), w2.shape[2]

    def run():
        gate_up = torch._grouped_mm(rows, w13_t, offs=offs)  # [N_valid, 2I]
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        return torch._grouped_mm(act, w2_t, offs=offs)  # [N_valid, H]

    return run, order


def vllm_fused_experts():
    """vLLM's fused_experts, or a string saying why it is unavailable."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as exc:  # noqa: BLE001  not installed, or built for another torch / CUDA
        return f"vllm not importable: {type(exc).__name__}"
    return fused_experts


def implementations(w13, w2, shape, ids, local_ids) -> dict:
    """name -> fn(x, weights) or a string saying why it is skipped. Ours gets the local ids (-1 off-shard)."""
    from elasticmoe.kernels import fused_moe

    num_experts, local = shape[0], shape[4]
    impls = {
        "elasticmoe-triton": lambda x, w: fused_moe(x, w13, w2, local_ids, w, backend="triton"),
        "elasticmoe-torch": lambda x, w: fused_moe(x, w13, w2, local_ids, w, backend="torch"),
    }
    fused_experts = vllm_fused_experts()
    if isinstance(fused_experts, str):
        impls["vllm-fused_experts"] = fused_experts
    else:
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=w13.device)
        expert_map[:local] = torch.arange(local, dtype=torch.int32, device=w13.device)
        impls["vllm-fused_experts"] = lambda x, w: fused_experts(
            x, w13, w2, w, ids.to(torch.int32), global_num_experts=num_experts,
            expert_map=None if local == num_experts else expert_map)
    return impls


def triton_stages(x, w13, w2, local_ids, weights) -> dict:
    """Per-kernel split of our pipeline: name -> fn, each fed with the previous stage's real outputs."""
    from elasticmoe.kernels import triton_moe, tuning
    from elasticmoe.kernels.triton_align import align_block_size_triton

    tokens, top_k, num_experts = x.shape[0], local_ids.shape[1], w13.shape[0]
    cfg = tuning.get_config(num_experts, w2.shape[2], x.shape[1], w13.dtype, tokens, x.device, top_k)
    launch = triton_moe.launch_options(cfg, w13.dtype)
    act, pair_out = triton_moe._buffers(tokens, top_k, w13, cfg["BLOCK_M"], w13.dtype)
    ids = local_ids.contiguous()
    flat_w = weights.float().reshape(-1).contiguous()
    out = torch.empty_like(x)
    with triton_moe.device_guard(x.device):
        routing = align_block_size_triton(ids, num_experts, cfg["BLOCK_M"])
    n = ids.numel()
    return {
        "align": lambda: align_block_size_triton(ids, num_experts, cfg["BLOCK_M"]),
        "gate_up": lambda: triton_moe.gate_up(x, w13, routing, top_k, launch, act),
        "down": lambda: triton_moe.down(act, w2, flat_w, routing, n, launch, pair_out[:n]),
        "topk_sum": lambda: triton_moe.topk_sum(pair_out[:n], ids.reshape(-1), num_experts, out),
    }


# ----------------------------------------------------------------------------- one model


def make_weights(shape, dtype, device, seed=0):
    """Random w13 [E_local, 2I, H] and w2 [E_local, H, I], scaled like trained weights."""
    _, hidden, inter, _, local = shape
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.empty(local, 2 * inter, hidden, dtype=dtype, device=device)
    w2 = torch.empty(local, hidden, inter, dtype=dtype, device=device)
    for e in range(local):  # one expert at a time: no fp32 copy of a 22 GB E=256 layer
        w13[e] = torch.randn(2 * inter, hidden, generator=g, device=device) / hidden**0.5
        w2[e] = torch.randn(hidden, inter, generator=g, device=device) / inter**0.5
    return w13, w2


def make_case(shape, tokens, dtype, device, seed=0):
    """(x [T, H], w13, w2, local ids [T, k], weights [T, k]) for tune_moe.py: realistic routing, local experts."""
    g = torch.Generator(device=device).manual_seed(seed + 1)
    w13, w2 = make_weights(shape, dtype, device, seed)
    x = torch.randn(tokens, shape[1], generator=g, device=device).to(dtype)
    _, local_ids, weights = route(tokens, shape, device, g)
    return x, w13, w2, local_ids, weights


def reference(x, w13, w2, local_ids, weights) -> torch.Tensor:
    """fp32 torch-path result, one expert's fp32 copy at a time (the check every implementation must pass)."""
    from elasticmoe.kernels.torch_moe import fused_moe_torch

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        ids_e = torch.where(local_ids == e, 0, -1)
        out += fused_moe_torch(x.float(), w13[e:e + 1].float(), w2[e:e + 1].float(), ids_e, weights, "segment")
    return out


def bench_model(name, shape, tokens_list, dtype, device, peaks) -> list[dict]:
    rows = []
    w13, w2 = make_weights(shape, dtype, device)
    g = torch.Generator(device=device).manual_seed(1)
    for tokens in tokens_list:
        x = torch.randn(tokens, shape[1], generator=g, device=device).to(dtype)
        ids, local_ids, weights = route(tokens, shape, device, g)
        ref = reference(x, w13, w2, local_ids, weights)
        counted = bytes_moved(shape, tokens, local_ids, w13.element_size())
        flops = 6 * int((local_ids >= 0).sum()) * shape[1] * shape[2]
        base = {"model": name, "tokens": tokens, "experts_hit": counted["experts_hit"], "bytes": counted}
        for impl, fn in implementations(w13, w2, shape, ids, local_ids).items():
            row = dict(base, impl=impl)
            row.update({"note": fn} if isinstance(fn, str) else _measure(lambda: fn(x, weights), ref, dtype, device))
            _rates(row, counted["ours" if impl == "elasticmoe-triton" else "min"], flops, peaks)
            rows.append(row)
            print(_format(row), flush=True)
        rows.append(_grouped_row(base, x, w13, w2, local_ids, weights, ref, dtype, device, counted, flops, peaks))
        print(_format(rows[-1]), flush=True)
        stages = triton_stages(x, w13, w2, local_ids, weights)
        split = {stage: time_us(fn, device, graph=device.type == "cuda") for stage, fn in stages.items()}
        rows.append(dict(base, impl="elasticmoe-triton-split", split_us=split))
        print(f"{'':>18} {tokens:>5} {'split us':>20}  " + "  ".join(f"{k} {v:.1f}" for k, v in split.items()))
    del w13, w2
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _grouped_row(base, x, w13, w2, local_ids, weights, ref, dtype, device, counted, flops, peaks) -> dict:
    """torch._grouped_mm alone, checked against the reference after the weighted top-k sum done outside."""
    row = dict(base, impl="torch._grouped_mm-only")
    try:
        run, order = grouped_mm_only(x, w13, w2, local_ids)
        y = run().float() * weights.reshape(-1)[order][:, None]  # order: pair indices of the sorted rows
        out = torch.zeros_like(ref).index_add_(0, order // local_ids.shape[1], y)
        row.update(_measure(run, ref, dtype, device, first=out))
    except Exception as exc:  # noqa: BLE001  e.g. grouped_mm needs sm_90 for bf16, 16-byte strides
        row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    _rates(row, counted["min"], flops, peaks)
    return row


def _measure(fn, ref, dtype, device, first=None) -> dict:
    """Check against the fp32 reference, then time (do_bench and CUDA graph). Errors become a note."""
    try:
        with torch.no_grad():
            err = _rel(fn() if first is None else first, ref)
            if err > TOLERANCE[dtype]:
                return {"err": err, "note": f"WRONG: rel err {err:.2e} > {TOLERANCE[dtype]:.0e}, not timed"}
            row = {"err": err, "us": time_us(fn, device)}
            if device.type == "cuda":
                try:
                    row["us_graph"] = time_us(fn, device, graph=True)
                except Exception as exc:  # noqa: BLE001  host syncs (the torch path) cannot be captured
                    row["graph_note"] = f"not capturable: {type(exc).__name__}"
            return row
    except Exception as exc:  # noqa: BLE001  OOM, unsupported dtype/arch, Triton out of resources
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def _rates(row: dict, n_bytes: int, flops: int, peaks: dict) -> None:
    us = row.get("us_graph", row.get("us"))
    if us:
        row.update(gbs=n_bytes / us / 1e3, tflops=flops / us / 1e6)
        row.update(pct_peak_bw=100 * row["gbs"] / peaks["bandwidth_gbs"],
                   pct_peak_flops=100 * row["tflops"] / peaks["matmul_tflops"])


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _format(row: dict) -> str:
    head = f"{row['model']:>18} {row['tokens']:>5} {row['impl']:>22}"
    if "gbs" not in row:
        return f"{head}  {row.get('note', '')}"
    return (f"{head} {row['us']:>9.1f} {row.get('us_graph', float('nan')):>9.1f} {row['tflops']:>7.1f}"
            f" {row['gbs']:>7.0f} {row['pct_peak_bw']:>5.1f}%  err {row['err']:.1e}")


def summarize(rows: list[dict]) -> list[dict]:
    """Ours vs the baselines per (model, T): %HBM at T <= 64, speed-up over grouped_mm alone from T = 256."""
    out = []
    for key in dict.fromkeys((r["model"], r["tokens"]) for r in rows):
        by = {r["impl"]: r for r in rows if (r["model"], r["tokens"]) == key}
        ours, grouped = by.get("elasticmoe-triton", {}), by.get("torch._grouped_mm-only", {})
        vllm = by.get("vllm-fused_experts", {})
        t_ours = ours.get("us_graph", ours.get("us"))
        t_grouped, t_vllm = grouped.get("us_graph", grouped.get("us")), vllm.get("us_graph", vllm.get("us"))
        line = {"model": key[0], "tokens": key[1], "ours_us": t_ours, "pct_peak_bw": ours.get("pct_peak_bw"),
                "vs_grouped_mm": t_grouped / t_ours if t_ours and t_grouped else None,
                "vs_vllm": t_vllm / t_ours if t_ours and t_vllm else None}
        if key[1] <= 64 and ours.get("experts_hit"):  # no local expert hit: nothing to stream
            line["bw_ok"] = bool(line["pct_peak_bw"] and line["pct_peak_bw"] >= 70)
        if key[1] >= 256:
            line["grouped_ok"] = bool(line["vs_grouped_mm"] and line["vs_grouped_mm"] >= 1.0)
        out.append(line)
    return out


def dry_run(models: dict, tokens_list: list[int], elem: int = 2) -> list[dict]:
    """Cases, routing and byte counts on the CPU (no weights allocated): what a GPU run would measure."""
    g = torch.Generator().manual_seed(1)
    plan = []
    for name, shape in models.items():
        for tokens in tokens_list:
            _, local_ids, _ = route(tokens, shape, torch.device("cpu"), g)
            counted = bytes_moved(shape, tokens, local_ids, elem)
            plan.append({"model": name, "tokens": tokens, "local_slots": int((local_ids >= 0).sum()),
                         "w13_elements": shape[4] * 2 * shape[2] * shape[1], **counted})
            print(plan[-1])
    return plan


def _versions() -> dict:
    import importlib.metadata as md

    found = {}
    for pkg in ("torch", "triton", "transformers", "vllm"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = None
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    CPU_RUNS[0] = args.cpu_runs
    models = SMOKE_MODELS if args.smoke else {m: MODELS[m] for m in (args.models or MODELS)}
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    if args.dry_run:
        dry_run(models, tokens)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if not args.smoke:
            sys.exit("no CUDA device: run with --smoke (CPU plumbing) or --dry-run")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from elasticmoe.kernels.tuning import device_name

    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    peaks = measure_peaks(device, dtype, args.smoke)
    print(f"device {device_name(device)}  dtype {dtype}  peak copy {peaks['bandwidth_gbs']:.0f} GB/s"
          f"  peak matmul {peaks['matmul_tflops']:.3g} TFLOP/s")
    print(f"{'model':>18} {'T':>5} {'impl':>22} {'us':>9} {'graph us':>9} {'TFLOP/s':>7} {'GB/s':>7} {'%BW':>6}")
    rows = []
    for name, shape in models.items():
        rows += bench_model(name, shape, tokens, dtype, device, peaks)
    suffix = "-smoke" if args.smoke else ""
    out = Path(args.out or REPO / "benchmarks" / "results" / f"kernels-{device_name(device)}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "benchmarks"))  # loaded by path too (tests), not only run as a script
    from machine import stamp  # benchmarks/machine.py

    meta = {**stamp(), "device": device_name(device), "args": vars(args), "dtype": str(dtype),
            "versions": _versions(), "peaks": peaks,
            "bytes": bytes_moved.__doc__.strip(), "flops": "6 * local slots * H * I (gate, up, down GEMMs)",
            "rates": "from the CUDA-graph time where there is one, else do_bench"}
    out.write_text(json.dumps({**meta, "summary": summarize(rows), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
