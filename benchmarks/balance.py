"""Rebalancing under skewed, drifting load: no replication vs the planner vs greedy-from-scratch each round.

Part 1 (planner, pure): 64 experts x 8 shards x 10 slots, Zipf-skewed per-expert token counts whose hot
experts drift every round. Per round: balancedness (mean/max shard load), relative throughput (a step lasts
as long as its busiest shard: tokens / max shard load, normalised to a perfect split) and expert copies moved.
Writes benchmarks/results/balance.json and an expert-load heatmap PNG before/after rebalancing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from elasticmoe.placement import Placement, greedy_from_scratch, plan
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

OUT = Path(__file__).parent / "results"


def zipf_load(rng: np.random.Generator, layers: int, experts: int, s: float, tokens: int) -> np.ndarray:
    """[layers, experts] token counts: Zipf(s) popularity over a random permutation of experts, sampled."""
    out = np.zeros((layers, experts))
    for l in range(layers):
        p = 1.0 / np.arange(1, experts + 1) ** s
        out[l, rng.permutation(experts)] = rng.multinomial(tokens, p / p.sum())
    return out


def drift(rng: np.random.Generator, load: np.ndarray, swaps: int) -> np.ndarray:
    """Hot experts cool and cold ones heat up: swap `swaps` random pairs of experts' loads per layer."""
    load = load.copy()
    for row in load:
        for _ in range(swaps):
            a, b = rng.choice(row.shape[0], 2, replace=False)
            row[[a, b]] = row[[b, a]]
    return load


def relative_tokens_s(per: np.ndarray) -> float:
    """Tokens/s of a step over [layers, shards] shard loads, relative to a perfect split: the layers run one after
    another and each lasts as long as its busiest shard, so sum of the means / sum of the maxima (not the mean of
    the per-layer ratios, which is balancedness_mean again and lets a light layer's balance hide a heavy one's)."""
    top = per.max(1).sum()
    return float(per.mean(1).sum() / top) if top > 0 else 1.0


def simulate(args) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    L, E, N, S = args.layers, args.experts, args.shards, args.slots
    load = zipf_load(rng, L, E, args.zipf, 100_000)
    even = Placement.even(L, E, N, S)
    cur = plan(load, N, S)  # round 0 from scratch
    prev_greedy = greedy_from_scratch(load, N, S)
    rows, maps = [], {"before": even.shard_load(load), "load": load}
    for r in range(1, args.rounds + 1):
        load = drift(rng, load, args.swaps)
        new = plan(load, N, S, current=cur, max_moves=args.max_moves)
        greedy = greedy_from_scratch(load, N, S)
        for name, p, moved in (("no replication", even, 0), ("planner (bounded moves)", new, len(cur.diff(new)[0])),
                               ("greedy from scratch", greedy, len(prev_greedy.diff(greedy)[0]))):
            bal = p.balancedness(load)
            rel = relative_tokens_s(p.shard_load(load))
            rows.append({"round": r, "system": name, "balancedness_min": float(bal.min()),
                         "balancedness_mean": float(bal.mean()), "relative_tokens_s": float(rel), "moved": moved})
        cur, prev_greedy = new, greedy
    maps["after"] = cur.shard_load(load)
    maps["final_load"] = load
    return rows, maps


def heatmap(maps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("tokens per (layer, expert)", maps["load"], "expert"),
              ("shard load, no replication", maps["before"], "shard"),
              ("shard load after rebalancing", maps["after"], "shard")]
    for ax, (title, data, xlabel) in zip(axes, panels):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def demo_topic_loads() -> tuple[list[str], np.ndarray]:
    """The demo model's real routing: per corpus paragraph (a topic), the tokens each expert of each MoE layer
    received (top-k selections, counted with transformers): (topic names, [topics, layers, experts])."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elasticmoe.model.demo import routing_counts
    from elasticmoe.model.embedded import ensure_tiny_model
    from elasticmoe.model.tokenizer import CORPUS

    path = ensure_tiny_model("demo")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    paras = [p.strip("\n") for p in CORPUS.split("\n\n")]
    return [" ".join(p.split()[:3]) for p in paras], np.stack([routing_counts(model, tok.encode(p)).numpy()
                                                               for p in paras])


def simulate_demo(shards: int, slots: int, max_moves: int) -> list[dict]:
    """Traffic moves from topic to topic of the demo corpus; each round re-plans on that topic's measured load."""
    names, loads = demo_topic_loads()
    _, L, E = loads.shape
    even = Placement.even(L, E, shards, slots)
    cur, prev_greedy = plan(loads[0], shards, slots), greedy_from_scratch(loads[0], shards, slots)
    rows = []
    for name, load in zip(names, loads):
        new = plan(load, shards, slots, current=cur, max_moves=max_moves)
        greedy = greedy_from_scratch(load, shards, slots)
        for system, p, moved in (("no replication", even, 0), ("planner (bounded moves)", new, len(cur.diff(new)[0])),
                                 ("greedy from scratch", greedy, len(prev_greedy.diff(greedy)[0]))):
            rows.append({"topic": name, "system": system, "balancedness_min": float(p.balancedness(load).min()),
                         "balancedness_mean": float(p.balancedness(load).mean()),
                         "relative_tokens_s": relative_tokens_s(p.shard_load(load)), "moved": moved,
                         "hottest_share": float((load / load.sum(1, keepdims=True)).max())})
        cur, prev_greedy = new, greedy
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["system"] for r in rows):
        rs = [r for r in rows if r["system"] == name]
        out.append({"system": name, "balancedness_min": min(r["balancedness_min"] for r in rs),
                    "balancedness_mean": float(np.mean([r["balancedness_mean"] for r in rs])),
                    "relative_tokens_s": float(np.mean([r["relative_tokens_s"] for r in rs])),
                    "moved_per_round": float(np.mean([r["moved"] for r in rs]))})
    return out


def _table(summary: list[dict]) -> None:
    print(f"{'system':<26}{'bal min':>9}{'bal mean':>10}{'rel tok/s':>11}{'copies moved/round':>20}")
    for s in summary:
        print(f"{s['system']:<26}{s['balancedness_min']:>9.3f}{s['balancedness_mean']:>10.3f}"
              f"{s['relative_tokens_s']:>11.3f}{s['moved_per_round']:>20.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--slots", type=int, default=10)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--swaps", type=int, default=2)
    ap.add_argument("--max-moves", type=int, default=32)
    ap.add_argument("--skip-demo", action="store_true", help="skip the case with the demo model's real routing")
    ap.add_argument("--demo-shards", type=int, default=2)
    ap.add_argument("--demo-slots", type=int, default=5, help="expert slots per (shard, layer) in the demo case")
    ap.add_argument("--out-dir", default=str(OUT), help="where balance.json and the heatmap go")
    a = ap.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, maps = simulate(a)
    summary = summarize(rows)
    heatmap(maps, out / "expert_load_heatmap.png")
    print(f"\n{a.layers} layers x {a.experts} experts on {a.shards} shards x {a.slots} slots, Zipf {a.zipf}, "
          f"{a.rounds} drift rounds ({a.swaps} swaps/layer), max_moves {a.max_moves} ({time.perf_counter() - t0:.1f}s)")
    _table(summary)
    result = {**stamp(), "args": vars(a), "summary": summary, "rounds": rows}
    if not a.skip_demo:
        demo = simulate_demo(a.demo_shards, a.demo_slots, max_moves=4)
        result["demo_model"] = {"summary": summarize(demo), "topics": demo}
        hot = max(r["hottest_share"] for r in demo)
        print(f"\ndemo model's learned routing (2 layers x 8 experts, top-2), {len(demo) // 3} corpus topics in turn, "
              f"{a.demo_shards} shards x {a.demo_slots} slots; hottest expert takes up to {hot:.0%} of a layer's "
              f"selections (uniform: 12.5%)")
        _table(result["demo_model"]["summary"])
    (out / "balance.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'balance.json'} and {out / 'expert_load_heatmap.png'}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    main()
