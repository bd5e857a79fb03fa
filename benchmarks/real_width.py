"""bf16 decode tok/s, load time, peak memory and logit error of `LLM.generate` vs transformers at real width.

One process per phase (build the Qwen3-30B-A3B-width checkpoint once into a cache dir, then elasticmoe, then
transformers), so each phase's peak RssAnon / RssFile (sampled from /proc/self/status) is its own. Decode tok/s =
batch * (new_tokens - 1) / (t(new_tokens) - t(1)), best of --repeats, after a warm-up run. Accuracy: the bf16
logits of both engines against transformers in float32 on the same (bf16) weights, over ACCURACY_PROMPTS, each
engine in its own process. Prints tables and writes benchmarks/results/real_width-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from decode_timing import decode_tok_s  # benchmarks/decode_timing.py
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "The mixture of experts model routes every token to a few experts, and"
ACCURACY_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Experts route tokens to a few specialised networks. " * 2,
    "In 1969 the first crewed landing on the Moon used a guidance computer with 4 KiB of erasable memory; " * 2,
    "def fused_moe(hidden, w13, w2, topk_ids, topk_weights):\n    out = torch.zeros_like(hidden)\n" * 3,
    "Il pleuvait sur la ville depuis trois jours, et les rues etroites du vieux port brillaient sous les lampes. " * 2,
]
WIDTH = {"family": "qwen3_moe", "experts": 128, "hidden": 2048, "intermediate": 768, "top_k": 8, "heads": 32,
         "kv_heads": 4}


class MemPeak:
    """Peak RssAnon / RssFile (bytes) of this process, sampled every `period` s by a daemon thread."""

    def __init__(self, period: float = 0.02):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(period,), daemon=True).start()

    def sample(self) -> dict[str, int]:
        now = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in self.peak:
                now[key] = int(line.split()[1]) * 1024
                self.peak[key] = max(self.peak[key], now[key])
        return now

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.sample()


def build(path: Path, layers: int) -> None:
    """The real-width checkpoint in bf16, built in bf16 (a float32 build would need 2x the memory) and saved
    by transformers' save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from elasticmoe.model import tiny

    a = tiny._resolve(WIDTH["family"], layers=layers, experts=WIDTH["experts"], hidden=WIDTH["hidden"],
                      intermediate=WIDTH["intermediate"], heads=WIDTH["heads"], kv_heads=WIDTH["kv_heads"],
                      vocab=None, top_k=WIDTH["top_k"], seed=0, sharpen=4.0, dtype="bfloat16")
    tok = tiny.make_tokenizer(a.vocab)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(tiny.tiny_config(a, tok), dtype=torch.bfloat16)
    with torch.no_grad():
        tiny._shape_weights(model, a)
    model.eval().generation_config.pad_token_id = tok.pad_token_id
    tiny.save_tiny_model(model, tok, path, args=a)


def _timed_decode(run, batch: int, new_tokens: int, repeats: int) -> float:
    run(new_tokens)  # warm-up
    best = {}
    for n in (new_tokens, 1):
        best[n] = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(n)
            best[n] = min(best[n], time.perf_counter() - t0)
    return decode_tok_s(batch, new_tokens, best[new_tokens], best[1])


def phase(engine: str, path: Path, batches: list[int], new_tokens: int, repeats: int) -> dict:
    """Load `engine` ("elasticmoe" | "transformers") from path in bf16 and time decode per batch size."""
    import torch

    mem = MemPeak()
    t0 = time.perf_counter()
    if engine == "elasticmoe":
        from elasticmoe import LLM, SamplingParams

        llm = LLM(str(path), dtype="bfloat16", max_num_seqs=max(batches))

        def runner(prompts):
            return lambda n: llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")

        def runner(prompts):
            enc = tok(prompts, return_tensors="pt", padding=True)

            def go(n):
                with torch.inference_mode():
                    model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            return go
    load_s = time.perf_counter() - t0
    after_load = mem.sample()
    load_peak = dict(mem.peak)
    rows = {}
    for b in batches:
        prompts = [PROMPT + " " + "x" * i for i in range(b)]  # different lengths
        rows[b] = _timed_decode(runner(prompts), b, new_tokens, repeats)
        print(f"{engine} batch {b}: {rows[b]:.2f} tok/s", file=sys.stderr, flush=True)  # progress
    mem.sample()
    return {"load_s": load_s, "after_load": after_load, "load_peak": load_peak, "peak": mem.peak,
            "tok_s": rows, "threads": torch.get_num_threads()}


def logits_phase(engine: str, path: Path, out: Path) -> dict:
    """Logits [T, V] float32 of every ACCURACY_PROMPTS prompt from `engine` ("elasticmoe" bf16 | "transformers"
    bf16 | "reference": transformers float32), saved to `out` (torch.save: a list of tensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))  # as LLM.encode tokenizes: the same ids for every engine
    ids = [tok.encode(p) for p in ACCURACY_PROMPTS]
    if engine == "elasticmoe":
        from elasticmoe import LLM

        llm = LLM(str(path), dtype="bfloat16")
        logits = [llm.logits(x) for x in ids]
    else:
        dtype = torch.float32 if engine == "reference" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        with torch.inference_mode():
            logits = [model(torch.tensor([x])).logits[0].float() for x in ids]
    torch.save(logits, out)
    return {"tokens": [len(x) for x in ids]}


def accuracy(path: Path, common: list[str]) -> dict:
    """Per engine: max and median over tokens of max_v |logits - ref| / max |ref| (ref: the prompt's float32 logits)."""
    import tempfile

    import torch

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {e: Path(tmp) / f"{e}.pt" for e in ("reference", "elasticmoe", "transformers")}
        for e, f in files.items():
            res["tokens"] = _child(["--phase", f"logits-{e}", "--logits-out", str(f), *common])["tokens"]
        ref = torch.load(files["reference"])
        for e in ("elasticmoe", "transformers"):
            errs = [(x - r).abs().amax(-1) / r.abs().max() for x, r in zip(torch.load(files[e]), ref)]  # [T] each
            res[e] = {"max_rel": [float(t.max()) for t in errs], "median_rel": [float(t.median()) for t in errs],
                      "max_rel_all": float(torch.cat(errs).max()), "median_rel_all": float(torch.cat(errs).median())}
    return res


def report_accuracy(acc: dict) -> None:
    print("\nbf16 logits vs transformers float32 on the same weights: max (median) over tokens of "
          "max|logits - ref| / max|ref|")
    print(f"{'prompt':>6} | {'tokens':>6} | {'elasticmoe':>17} | {'transformers':>17}")
    ours, hf = acc["elasticmoe"], acc["transformers"]
    for i, n in enumerate(acc["tokens"]):
        print(f"{i:>6} | {n:>6} | {ours['max_rel'][i]:>7.4f} ({ours['median_rel'][i]:.4f}) | "
              f"{hf['max_rel'][i]:>7.4f} ({hf['median_rel'][i]:.4f})")
    print(f"{'all':>6} | {sum(acc['tokens']):>6} | {ours['max_rel_all']:>7.4f} ({ours['median_rel_all']:.4f}) | "
          f"{hf['max_rel_all']:>7.4f} ({hf['median_rel_all']:.4f})")


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f}"


def report(res: dict, a: argparse.Namespace) -> None:
    ours, hf = res["elasticmoe"], res["transformers"]
    print(f"\nCPU: {res['cpu']} ({os.cpu_count()} cpus, torch threads {ours['threads']}); qwen3_moe real width: "
          f"{a.layers} layers x 128 experts, hidden 2048, expert FFN 768, top-8, 32/4 heads; bf16")
    print(f"{'batch':>5} | {'elasticmoe tok/s':>16} | {'transformers tok/s':>18} | {'ratio':>6}")
    for b in a.batches:
        o, t = ours["tok_s"][str(b)], hf["tok_s"][str(b)]
        print(f"{b:>5} | {o:>16.2f} | {t:>18.2f} | {o / t:>5.2f}x")
    print(f"{'':>14} | {'load s':>7} | {'peak anon GiB':>12} | {'peak file GiB':>12} | "
          f"{'anon/file after load GiB':>24}")
    for name, r in (("elasticmoe", ours), ("transformers", hf)):
        after = f"{_gb(r['after_load']['RssAnon'])} / {_gb(r['after_load']['RssFile'])}"
        print(f"{name:>14} | {r['load_s']:>7.1f} | {_gb(r['peak']['RssAnon']):>12} | "
              f"{_gb(r['peak']['RssFile']):>12} | {after:>24}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", default=None, help="checkpoint dir (default $ELASTICMOE_CACHE/bench/real_width-<L>L)")
    ap.add_argument("--only", choices=("speed", "accuracy"), default=None, help="run one part (default both)")
    ap.add_argument("--phase", choices=("build", "elasticmoe", "transformers", "logits-elasticmoe",
                                        "logits-transformers", "logits-reference"), help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.batches = [int(x) for x in str(a.batches).split(",")]
    root = Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()
    path = Path(a.cache or root / "bench" / f"real_width-{a.layers}L")
    if a.phase == "build":
        build(path, a.layers)
        print(json.dumps({"built": str(path)}))
        return
    if a.phase and a.phase.startswith("logits-"):
        print(json.dumps(logits_phase(a.phase.removeprefix("logits-"), path, Path(a.logits_out))))
        return
    if a.phase:
        print(json.dumps(phase(a.phase, path, a.batches, a.new_tokens, a.repeats)))
        return
    common = ["--layers", str(a.layers), "--cache", str(path), "--new-tokens", str(a.new_tokens),
              "--batches", ",".join(map(str, a.batches)), "--repeats", str(a.repeats)]
    if not (path / "config.json").exists():
        _child(["--phase", "build", *common])
    args = {k: v for k, v in vars(a).items() if k not in ("phase", "logits_out")}
    res = {**stamp(), "args": args, "checkpoint": str(path)}
    tag = re.sub(r"[^A-Za-z0-9]+", "-", res["cpu"]).strip("-").lower()
    out = Path(a.out or Path(__file__).parent / "results" / f"real_width-{tag}.json")
    if a.only and out.exists():  # keep the other part's figures
        res = {**json.loads(out.read_text()), **stamp(), "checkpoint": res["checkpoint"]}
    if a.only != "accuracy":
        res["args"], res["speed_date"] = args, res["date"]  # these figures' run
        for engine in ("elasticmoe", "transformers"):
            res[engine] = _child(["--phase", engine, *common])
        report(res, a)
    if a.only != "speed":
        res["accuracy"] = {**accuracy(path, common), "date": res["date"]}
        report_accuracy(res["accuracy"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
