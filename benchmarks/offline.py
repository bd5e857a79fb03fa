"""Decode tokens/s of `LLM.generate` vs transformers `generate`: same checkpoint, machine and run; prints a table,
writes JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from decode_timing import decode_tok_s  # benchmarks/decode_timing.py
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "The mixture of experts model routes every token to a few experts, and"


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_ours(llm, prompts, new_tokens: int, repeats: int) -> float:
    from elasticmoe import SamplingParams

    def run(n):
        return lambda: llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    run(new_tokens)()  # warm-up
    t_full, t_one = _time(run(new_tokens), repeats), _time(run(1), repeats)
    return decode_tok_s(len(prompts), new_tokens, t_full, t_one)


def bench_hf(model, tok, prompts, new_tokens: int, repeats: int) -> float:
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)

    def run(n):
        def go():
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        return go

    run(new_tokens)()
    t_full, t_one = _time(run(new_tokens), repeats), _time(run(1), repeats)
    return decode_tok_s(len(prompts), new_tokens, t_full, t_one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "offline.json"))
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elasticmoe import LLM
    from elasticmoe.model.tiny import make_tiny_model

    ckpt = make_tiny_model("mixtral", Path(tempfile.mkdtemp()) / "m", layers=a.layers, experts=a.experts,
                           hidden=a.hidden, intermediate=a.intermediate, heads=8, kv_heads=4)
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=16)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        prompts = [PROMPT + " " + "x" * i for i in range(b)]  # different lengths
        ours = bench_ours(llm, prompts, a.new_tokens, a.repeats)
        theirs = bench_hf(hf, tok, prompts, a.new_tokens, a.repeats)
        rows.append({"batch": b, "elasticmoe_tok_s": ours, "transformers_tok_s": theirs, "ratio": ours / theirs})
    print(f"\nmodel: mixtral-like, {a.layers} layers x {a.experts} experts, hidden {a.hidden}, "
          f"intermediate {a.intermediate}, fp32, CPU, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5} | {'elasticmoe tok/s':>16} | {'transformers tok/s':>18} | {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} | {r['elasticmoe_tok_s']:>16.1f} | {r['transformers_tok_s']:>18.1f} | "
              f"{r['ratio']:>5.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), **stamp(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "args": vars(a)}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
