"""Grid-search Triton MoE tile configs on this GPU; writes E=..,N=..,K=..,dtype=..,device=<gpu>.json.

The file goes to the per-GPU config directory that elasticmoe.kernels.tuning searches first
($ELASTICMOE_MOE_CONFIG_DIR, else $ELASTICMOE_CACHE/moe_configs); --out-dir elasticmoe/kernels/configs
ships it with the package instead. Routing is realistic (softmax top-k over all experts; on an EP shard
only the local experts' slots are kept). Timed with CUDA graphs, like benchmarks/kernels.py.

python benchmarks/tune_moe.py --model qwen3-30b-a3b            (bf16, tokens 1..4096)
python benchmarks/tune_moe.py --shape 64 2048 1408 6 --quick   (E H I k: any other model, all experts local)
python benchmarks/tune_moe.py --smoke --out-dir /tmp/t           (CPU plumbing check: Triton interpreter, 3 configs)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# benchmarks/kernels.py
from kernels import MODELS, SMOKE_MODELS, SMOKE_TOKENS, TOKENS, make_case, reference  # noqa: E402

MAX_ACC_REGS = 128  # fp32 accumulator registers per thread (gate + up tiles in GEMM 1)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", choices=list(MODELS))
    group.add_argument("--shape", nargs=4, type=int, metavar=("E", "H", "I", "K"))
    group.add_argument("--smoke", action="store_true", help="tiny shape on CPU under the Triton interpreter")
    p.add_argument("--tokens", nargs="*", type=int, default=None, help=f"default {TOKENS} ({SMOKE_TOKENS} smoke)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 (float32 smoke: the interpreter's bf16 is wrong)")
    p.add_argument("--quick", action="store_true", help="smaller search space (minutes instead of ~an hour)")
    p.add_argument("--cpu-runs", type=int, default=2,
                   help="smoke: timed runs per config, the correctness check's the first; the best kept (default 2)")
    p.add_argument("--out-dir", default=None,
                   help="default: $ELASTICMOE_MOE_CONFIG_DIR or $ELASTICMOE_CACHE/moe_configs (searched first)")
    return p.parse_args()


def search_space(rows_per_expert: float, elem_bytes: int, quick: bool, smem_limit: int) -> list[dict]:
    """Tile configs worth trying: BLOCK_M capped by the rows per expert, BN=32 for decode, smem/register fits."""
    from elasticmoe.kernels import tuning

    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, triton_next_pow2(int(rows_per_expert) + 1))]
    space = itertools.product(
        block_ms, (32, 64, 128), (64, 128) if quick else (64, 128, 256),
        (1, 8) if quick else (1, 8, 16), (4, 8), (3, 4) if quick else (2, 3, 4, 5),
    )
    configs = []
    for bm, bn, bk, group, warps, stages in space:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps,
               "num_stages": stages}
        acc_regs = 2 * bm * bn // (warps * 32)
        if tuning.smem_bytes(cfg, elem_bytes) <= smem_limit and acc_regs <= MAX_ACC_REGS:
            configs.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group,
                            "num_warps": warps, "num_stages": stages})
    return configs


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _time_us(fn, device: torch.device, cpu_runs: int = 2) -> float:
    """Median microseconds: CUDA-graph replay on a GPU; on CPU (smoke) the best of `cpu_runs` plain runs."""
    if device.type == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=25, return_mode="median")
    best = float("inf")
    for _ in range(cpu_runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best


def tune_tokens(shape, tokens, dtype, quick, device=torch.device("cuda"), limit: int | None = None,
                cpu_runs: int = 2) -> tuple[dict, float]:
    """Fastest correct config for one token count (of the first `limit` candidates) -> (config, microseconds)."""
    from elasticmoe.kernels import tuning
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    x, w13, w2, ids, weights = make_case(shape, tokens, dtype, device)
    ref = reference(x, w13, w2, ids, weights)
    best, best_us = None, float("inf")
    rows = max(1.0, float((ids >= 0).sum()) / w13.shape[0])
    limit_smem = tuning.smem_limit(str(device))
    fitted = tuning.distinct(tuning.finalize(c, w2.shape[2], x.shape[1], w13.dtype, limit_smem)  # as get_config runs
                             for c in search_space(rows, w13.element_size(), quick, limit_smem))
    passes = [0]

    def run(cfg):
        passes[0] += 1
        return fused_moe_triton(x, w13, w2, ids, weights, config=cfg)

    for cfg in fitted[:limit]:
        try:
            start = time.perf_counter()
            out = run(cfg).float()
            check_us = 1e6 * (time.perf_counter() - start)
            if (out - ref).abs().max() > 2e-2 * ref.abs().max():
                print(f"  T={tokens} {cfg}: wrong result, skipped", flush=True)
                continue
            if device.type == "cuda":
                us = _time_us(lambda: run(cfg), device)
            else:  # the interpreter compiles nothing: the check was a timed run too
                us = min(check_us, _time_us(lambda: run(cfg), device, cpu_runs - 1))
        except Exception as exc:  # noqa: BLE001  out of shared memory / registers on this GPU
            print(f"  T={tokens} {cfg}: {type(exc).__name__}", flush=True)
            continue
        if us < best_us:
            best, best_us = cfg, us
    print(f"  T={tokens}: {passes[0]} forward passes over {len(fitted[:limit])} configs", flush=True)
    if best is None:
        raise RuntimeError(f"no config compiled and passed for T={tokens}")
    return best, best_us


def main() -> None:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    elif not torch.cuda.is_available():
        sys.exit("tune_moe.py needs a CUDA GPU (or --smoke)")
    from elasticmoe.kernels import tuning

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        shape = SMOKE_MODELS["smoke"]
    else:
        shape = tuple(MODELS[args.model] if args.model else (*args.shape, args.shape[0]))
    _, hidden, inter, _, num_experts = shape  # the table is keyed by the experts held (E_local)
    dtype = getattr(torch, args.dtype or ("float32" if args.smoke else "bfloat16"))
    table = {}
    for tokens in args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS):
        cfg, us = tune_tokens(shape, tokens, dtype, args.quick or args.smoke, device, 3 if args.smoke else None,
                              args.cpu_runs)
        table[str(tokens)] = cfg
        print(f"T={tokens:>5}: {us:9.1f} us  {cfg}", flush=True)
    name = tuning.config_file_name(num_experts, inter, hidden, dtype, tuning.device_name(device))
    out = Path(args.out_dir or tuning.user_config_dir()) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    tuning.clear_cache()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
