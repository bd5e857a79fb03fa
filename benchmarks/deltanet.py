"""Gated DeltaNet prefill: the delta rule of one linear layer over a prompt, chunked (64-token blocks, as prefill chunks
run it) against token by token (the decode path's step, its twin), in the same process.

Qwen3-Next-80B-A3B's head layout by default (16 key heads x 128 repeated to 32 value heads x 128), float32 on CPU,
1 torch thread, from a nonzero starting state; inputs made as the layer makes them (q, k l2-normed, q scaled, log
decays <= 0 from Qwen3-Next's initial A_log and dt_bias, beta a sigmoid). Times the delta rule alone: the layer's
projections, conv and gated norm are the same either way and not timed. Best of --repeats per method and length,
after one warm-up, in this thread's CPU time (what a shared machine's other processes take of it left out; wall times
beside it). Prints a table and writes benchmarks/results/deltanet-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

RESULTS = Path(__file__).parent / "results"


def inputs(tokens: int, k_heads: int, v_heads: int, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k [v_heads, T, d] (k_heads each repeated, l2-normed, q scaled), v [v_heads, T, d], g, beta [v_heads, T],
    a starting state [v_heads, d, d]; float32."""
    from elasticmoe.model.deltanet import l2norm

    gen = torch.Generator().manual_seed(seed)
    rep = v_heads // k_heads
    q, k = (l2norm(torch.randn(k_heads, tokens, head_dim, generator=gen)).repeat_interleave(rep, dim=0)
            for _ in range(2))
    v = torch.randn(v_heads, tokens, head_dim, generator=gen)
    rate = torch.rand(v_heads, 1, generator=gen) * 16  # exp(A_log) as Qwen3-Next initialises it: uniform(0, 16)
    g = -rate * F.softplus(torch.randn(v_heads, tokens, generator=gen) + 1)  # [v_heads, T] log decay; dt_bias 1
    beta = torch.randn(v_heads, tokens, generator=gen).sigmoid()
    state = torch.randn(v_heads, head_dim, head_dim, generator=gen)
    return q * head_dim**-0.5, k, v, g, beta, state


def _best(fn, args: tuple, repeats: int) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
    """(best thread CPU seconds, best wall seconds, the result) of `repeats` runs after a warm-up. With one torch
    thread the work runs on this thread, so its CPU time leaves out what other processes take of a shared machine."""
    result = fn(*args)  # warm-up
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn(*args)
        cpu, wall = min(cpu, time.thread_time() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall, result


def measure(tokens: int, a: argparse.Namespace) -> dict:
    from elasticmoe.model.deltanet import chunked_rule, recurrent_rule

    args = inputs(tokens, a.k_heads, a.v_heads, a.head_dim)
    with torch.inference_mode():
        rec_cpu, rec_wall, (rec_out, rec_end) = _best(recurrent_rule, args, a.repeats)
        cpu, wall, (out, end) = _best(chunked_rule, args, a.repeats)
    return {"tokens": tokens, "recurrent_ms": rec_cpu * 1e3, "chunked_ms": cpu * 1e3, "speedup": rec_cpu / cpu,
            "recurrent_wall_ms": rec_wall * 1e3, "chunked_wall_ms": wall * 1e3,
            "max_abs_diff_out": float((out - rec_out).abs().max()),
            "max_abs_diff_state": float((end - rec_end).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="prompt lengths (one run each)")
    p.add_argument("--k-heads", type=int, default=16)
    p.add_argument("--v-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128, help="key and value head width")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method and length (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", help="default: benchmarks/results/deltanet-<cpu>.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    rows = [measure(t, a) for t in a.tokens]
    res = {**stamp(), "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_before": load,
           "loadavg_after": os.getloadavg()[0], "args": vars(a), "rows": rows}
    print(f"{res['cpu']} ({res['cpus']} CPUs), {res['threads']} thread(s), {a.k_heads} key heads / {a.v_heads} value "
          f"heads x {a.head_dim}, float32, load average {load:.1f} before and {res['loadavg_after']:.1f} after")
    print("thread CPU ms (wall ms), best of each")
    print(f"{'tokens':>6} {'recurrent ms':>20} {'chunked ms':>20} {'speed-up':>9} {'max |diff| out':>15} "
          f"{'max |diff| state':>17}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['recurrent_ms']:>10.1f} ({r['recurrent_wall_ms']:>7.1f}) {r['chunked_ms']:>10.1f} "
              f"({r['chunked_wall_ms']:>7.1f}) {r['speedup']:>8.1f}x {r['max_abs_diff_out']:>15.1e} "
              f"{r['max_abs_diff_state']:>17.1e}")
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", res["cpu"]).strip("-").lower()
    out = Path(a.json) if a.json else RESULTS / f"deltanet-{cpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
