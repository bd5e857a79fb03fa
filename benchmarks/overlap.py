"""Decode step time of the micro-batch schedules when every expert call takes d ms (a remote shard); table + JSON."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class LatencyDispatcher:
    """Experts as on a remote shard whose round trip is `delay_s`: a call's answer is ready `delay_s` after its
    dispatch, and wait() sleeps until then. The shard's compute is not ours: each call of a step is computed
    once (warm-up) and remembered, so a timed step costs this process its dense work and the waits, no more;
    no thread is woken, so the machine's scheduler adds nothing but the sleeps' own wake-ups."""

    remote = True

    def __init__(self, store, delay_s: float):
        self.store, self.delay_s = store, delay_s
        self.memo: dict[tuple, torch.Tensor] = {}
        self.schedule = ""  # part of the memo key: each schedule's step is the same every time
        self.ready: list[tuple[int, int, float]] = []  # (layer, call of the layer, time its answer was ready)
        self.exposed_s = 0.0  # this step's time slept in wait(): the latency the schedule left unhidden
        self._calls: dict[int, int] = {}

    def new_step(self, schedule: str) -> None:
        self.schedule, self.ready, self.exposed_s = schedule, [], 0.0
        self._calls.clear()

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        ready_at = time.perf_counter() + self.delay_s
        nth = self._calls.get(layer, 0)
        self._calls[layer] = nth + 1
        self.ready.append((layer, nth, ready_at))
        key = (self.schedule, layer, nth, hidden.shape[0])
        return _Remote(self, key, ready_at, (layer, hidden, topk_ids, topk_weights))


class _Remote:
    def __init__(self, disp: LatencyDispatcher, key, ready_at: float, call):
        self.disp, self.key, self.ready_at, self.call = disp, key, ready_at, call

    def wait(self) -> torch.Tensor:
        out = self.disp.memo.get(self.key)
        if out is None:  # warm-up: compute it here (untimed)
            layer, hidden, topk_ids, topk_weights = self.call
            out = self.disp.memo[self.key] = self.disp.store.forward(layer, hidden, topk_ids, topk_weights
                                                                     ).to(hidden.dtype)
        rest = self.ready_at - time.perf_counter()
        if rest > 0:
            self.disp.exposed_s += rest
            time.sleep(rest)
        return out


def old_schedule(model, batches, cache, dispatcher):
    """forward_pipelined as it was before the ping-pong (b9aca81): per layer pre(A), pre(B), post(A), post(B)."""
    from elasticmoe.model.dense import _MicroBatch
    from elasticmoe.model.layers import norm

    sp, mbs = model.spec, [_MicroBatch(model, b) for b in batches]
    with torch.inference_mode():
        for layer in model.layers:
            started = [model._layer_pre(layer, mb.h, mb.batch, cache, dispatcher, *mb.tables) for mb in mbs]
            for mb, (h, x, pending) in zip(mbs, started):
                mb.h = model._layer_post(layer, h, x, pending)
        return [norm(mb.h[mb.batch.last_rows], sp.norm, model.norm, model.norm_bias, sp.rms_norm_eps) for mb in mbs]


def make_model(args) -> str:
    from elasticmoe.model.tiny import make_tiny_model

    out = Path(tempfile.mkdtemp(prefix="overlap-")) / args.family
    make_tiny_model(args.family, out, layers=args.layers, experts=args.experts, hidden=args.hidden,
                    intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads)
    return str(out)


def decode_batches(llm, tokens: int, context: int, n: int):
    """A decode step of `tokens` sequences (one new token each, `context` cached), cut into n micro-batches;
    the cache is filled by a prefill first."""
    from elasticmoe.model.attention import KVCache
    from elasticmoe.model.batch import build_batch
    from elasticmoe.model.dispatch import LocalDispatcher
    from elasticmoe.model.pipeline import split_even

    cpu = torch.device("cpu")
    cache = KVCache(llm.engine.spec, tokens, context + 8, llm.engine.dtype, cpu)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 400, (context + 1,), generator=g).tolist() for _ in range(tokens)]
    for s, p in enumerate(prompts):
        llm.engine.model.forward(build_batch([(s, 0, p[:context])], cpu, cache.table), cache,
                                 LocalDispatcher(llm.store))
    chunks = [(s, context, [p[context]]) for s, p in enumerate(prompts)]
    return cache, [build_batch(chunks[a:b], cpu, cache.table) for a, b in split_even([1] * tokens, n)]


def trace_overlap(llm, disp, cache, parts) -> float:
    """Fraction of layer boundaries l (MoE layers l, l+1) where pre_{l+1}(A) started before B's layer-l experts
    were back, from one traced ping-pong step."""
    model, starts = llm.engine.model, {}
    real_pre = model._layer_pre

    def pre(layer, h, batch, *rest):
        starts.setdefault((layer.attn.layer, id(batch)), time.perf_counter())
        return real_pre(layer, h, batch, *rest)

    model._layer_pre = pre
    try:
        disp.new_step("ping-pong 2")
        model.forward_pipelined(parts, cache, disp)
    finally:
        del model._layer_pre
    done = {(layer, nth): t for layer, nth, t in disp.ready}
    moe = [layer.attn.layer for layer in model.layers if layer.sparse]
    pairs = [(l, l + 1) for l in moe if l + 1 in moe]
    hits = [starts[nxt, id(parts[0])] < done[l, 1] for l, nxt in pairs]
    return sum(hits) / max(len(hits), 1)


def measure(llm, tokens: int, delay_ms: float, args) -> dict:
    """Median step time (ms) of each schedule, timed round robin so that machine noise hits all alike."""
    disp = LatencyDispatcher(llm.store, delay_ms / 1000)
    model = llm.engine.model
    runs = {}
    old = lambda *a: old_schedule(model, *a)  # noqa: E731
    for name, n, fn in [("sequential (1)", 1, model.forward_pipelined), ("old 2", 2, old),
                        ("ping-pong 2", 2, model.forward_pipelined), ("ping-pong 3", 3, model.forward_pipelined)]:
        cache, parts = decode_batches(llm, tokens, args.context, n)
        runs[name] = (fn, cache, parts)
    times: dict[str, list[float]] = {name: [] for name in runs}
    exposed: dict[str, list[float]] = {name: [] for name in runs}
    outs = {}
    for rep in range(args.repeats + 2):
        for name, (fn, cache, parts) in runs.items():
            disp.new_step(name)
            t0 = time.perf_counter()
            out = fn(parts, cache, disp)
            if rep >= 2:  # two warm-up rounds fill the shard's memo
                times[name].append((time.perf_counter() - t0) * 1000)
                exposed[name].append(disp.exposed_s * 1000)
            outs[name] = torch.cat(out)
    ref = outs["sequential (1)"]
    diff = max(float((o - ref).abs().max() / ref.abs().max()) for o in outs.values())
    seq = statistics.median(times["sequential (1)"])
    rows = {name: {"median_ms": round(statistics.median(t), 3), "p10_ms": round(sorted(t)[len(t) // 10], 3),
                   "ratio_vs_sequential": round(statistics.median(t) / seq, 3),
                   "exposed_wait_ms": round(statistics.median(exposed[name]), 3)} for name, t in times.items()}
    _, cache, parts = runs["ping-pong 2"]
    return {"tokens": tokens, "delay_ms": delay_ms, "schedules": rows, "max_rel_diff_vs_sequential": diff,
            "pingpong2_pre_next_before_other_done": trace_overlap(llm, disp, cache, parts),
            "floor_ms": delay_ms * sum(layer.sparse for layer in model.layers)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="qwen2_moe", help="tiny family (qwen2_moe: shared expert and gate)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=256, help="expert FFN size (shared expert: the same)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=64, help="tokens cached per sequence")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64], help="decode tokens (= sequences) per step")
    ap.add_argument("--delays-ms", type=float, nargs="+", default=[0, 1, 3])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", default="benchmarks/results/overlap.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from elasticmoe import LLM

    llm = LLM(make_model(args), dtype="float32")
    results = [measure(llm, t, d, args) for t in args.tokens for d in args.delays_ms]
    names = list(results[0]["schedules"])
    print(f"{args.family}, {args.layers} layers ({sum(l.sparse for l in llm.engine.model.layers)} MoE), hidden "
          f"{args.hidden}, {args.experts} experts, {args.threads} torch thread(s); median step ms (ratio to "
          f"sequential) and w: median ms of it spent waiting for experts")
    print(f"{'T':>4} {'d ms':>5} " + " ".join(f"{n:>27}" for n in names) + "  floor  pre-next-first")
    for r in results:
        cells = " ".join(f"{c['median_ms']:>9.1f} ({c['ratio_vs_sequential']:.2f}) w{c['exposed_wait_ms']:>6.1f}"
                         for c in (r["schedules"][n] for n in names))
        print(f"{r['tokens']:>4} {r['delay_ms']:>5g} {cells}  {r['floor_ms']:>5g}  "
              f"{r['pingpong2_pre_next_before_other_done']:.0%}")
    meta = {**stamp(), "loadavg_1m": os.getloadavg()[0], "torch": torch.__version__,
            "args": vars(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"{meta['cpu']}, load {meta['loadavg_1m']:.1f} -> {args.json}")


if __name__ == "__main__":
    main()
