"""benchmarks/ without Ray, in one process: offline, overlap, balance, sparse_attention (both forms), mla_decode and
deltanet run at toy sizes, as `python script.py` runs them, each test checking its own run's report."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

from tests.bench_util import snippet


IN_ONE = {  # toy runs in one process: one import of torch and transformers (~2.5 and ~6 CPU-s a process) for all
    "offline": ("offline.py", "--layers", "2", "--hidden", "64", "--intermediate", "64", "--new-tokens", "16",
                "--batches", "1,2", "--repeats", "2", "--out"),  # 16 new tokens, best of 2: see the offline test
    "overlap": ("overlap.py", "--layers", "2", "--hidden", "128", "--intermediate", "64", "--heads", "4",
                "--kv-heads", "2", "--context", "8", "--tokens", "4", "--delays-ms", "0", "1", "--repeats", "2",
                "--json"),
    "balance": ("balance.py", "--layers", "2", "--experts", "16", "--shards", "4", "--slots", "6", "--rounds", "3",
                "--max-moves", "4", "--out-dir"),  # balance.json in that folder
    "sparse_attention-absorbed": ("sparse_attention.py", "--lengths", "48", "96", "--topk", "16", "--rows", "3",
                                  "--heads", "2", "--kv-lora-rank", "16", "--rope", "8", "--nope", "8",
                                  "--v-head-dim", "8", "--index-heads", "2", "--index-dim", "8", "--repeats", "1",
                                  "--form", "absorbed", "--json"),
    "mla_decode": ("mla_decode.py", "--lengths", "20", "50", "--rows", "3", "--heads", "2", "--kv-lora-rank", "16",
                   "--rope", "8", "--nope", "8", "--v-head-dim", "8", "--repeats", "1", "--json"),
    "deltanet": ("deltanet.py", "--tokens", "5", "70", "--k-heads", "2", "--v-heads", "4", "--head-dim", "16",
                 "--repeats", "1", "--json"),
}
IN_ONE["sparse_attention-expand"] = IN_ONE["sparse_attention-absorbed"][:-2] + ("expand", "--json")
RUN_SCRIPTS = """
import json, runpy, sys, traceback
runs, status = json.loads(sys.argv[1]), {}
for name, argv in runs.items():  # each as `python script.py argv...` runs it (run_name __main__)
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        status[name] = "ok"
    except SystemExit as e:
        status[name] = "ok" if e.code in (None, 0) else f"exit {e.code}"
    except BaseException:
        status[name] = traceback.format_exc()
print(json.dumps(status))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (its status: "ok" or the error, its JSON report, its output path), of every IN_ONE run, in one
    process."""
    out = tmp_path_factory.mktemp("in_one")
    todo = {name: [*argv, str(out / (name if argv[-1] == "--out-dir" else f"{name}.json"))]
            for name, argv in IN_ONE.items()}
    proc = snippet(RUN_SCRIPTS.replace("sys.argv[1]", repr(json.dumps(todo))), 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    paths = {name: Path(argv[-1]) for name, argv in todo.items()}  # balance: its --out-dir
    reports = {name: p / "balance.json" if p.is_dir() else p for name, p in paths.items()}
    return {name: (status[name], p.exists() and json.loads(p.read_text()), paths[name]) for name, p in reports.items()}


def _report(runs: dict, name: str) -> dict:
    status, report, _ = runs[name]
    assert status == "ok", status
    return report


def test_offline_benchmark_smoke(runs):
    """LLM.generate against transformers generate on one checkpoint: a row per batch, the ratio from the two."""
    # 16 new tokens, best of 2 (IN_ONE): the full run stays ~15 decode steps over the one-token run (decode_tok_s's
    # noise check), at a quarter of the steps that 48 tokens x 3 repeats took (~390 engine steps, ~10 s CPU)
    rows = _report(runs, "offline")["rows"]
    assert [r["batch"] for r in rows] == [1, 2], rows
    for r in rows:
        assert r["elasticmoe_tok_s"] > 0 and r["transformers_tok_s"] > 0, r
        assert r["ratio"] == pytest.approx(r["elasticmoe_tok_s"] / r["transformers_tok_s"]), r


def test_overlap_benchmark_smoke(runs):
    """The micro-batch schedules with simulated expert latency: every schedule timed per (tokens, delay), the
    ratios against the sequential one, and no wait exposed when calls take no time."""
    results = _report(runs, "overlap")["results"]
    assert [(r["tokens"], r["delay_ms"]) for r in results] == [(4, 0.0), (4, 1.0)], results
    for r in results:
        seq = r["schedules"]["sequential (1)"]["median_ms"]
        assert len(r["schedules"]) >= 3, r
        for name, s in r["schedules"].items():
            assert s["median_ms"] > 0 and s["exposed_wait_ms"] >= 0, (name, s)
            assert s["ratio_vs_sequential"] == pytest.approx(s["median_ms"] / seq, rel=0.02), (name, s)
            if r["delay_ms"] == 0:
                assert s["exposed_wait_ms"] == 0, (name, s)


@pytest.mark.parametrize("form", ["absorbed", "expand"])
def test_sparse_attention_benchmark_smoke(runs, form):
    """One MLA decode group read both ways at two lengths past topk, the latents attended with kv_b absorbed (the
    engine's decode) or expanded: each row's times, the speed-up from them, and the gathered output equal to the
    masked one."""
    report = _report(runs, f"sparse_attention-{form}")
    assert report["cpu"] and [(r["length"], r["topk"], r["rows"]) for r in report["rows"]] == [(48, 16, 3), (96, 16, 3)]
    assert report["args"]["form"] == form
    for r in report["rows"]:
        assert r["mask_ms"] > 0 and r["gather_ms"] > 0 and r["indexer_ms"] > 0 and r["indexer_read"] == "paged spans"
        assert r["speedup"] == pytest.approx(r["mask_ms"] / r["gather_ms"]) and r["max_abs_diff"] < 1e-5, r


def test_mla_decode_benchmark_smoke(runs):
    """One MLA decode group read with kv_b absorbed and with every latent expanded, at two lengths: each row's
    times, the speed-up from them, and the two outputs within float32 rounding of each other."""
    report = _report(runs, "mla_decode")
    assert report["cpu"] and [(r["length"], r["rows"]) for r in report["rows"]] == [(20, 3), (50, 3)]
    for r in report["rows"]:
        assert r["expand_ms"] > 0 and r["absorbed_ms"] > 0 and r["max_abs"] > 0.1, r
        assert r["speedup"] == pytest.approx(r["expand_ms"] / r["absorbed_ms"]) and r["max_abs_diff"] < 1e-5, r


def test_balance_benchmark_smoke(runs):
    """The rebalancing simulation (drifting Zipf load, then the demo model's learned routing): the planner balances
    at least as well as no replication and moves fewer copies than greedy-from-scratch, within its move budget."""
    report = _report(runs, "balance")
    assert report["cpu"], report.keys()
    assert (runs["balance"][2] / "expert_load_heatmap.png").stat().st_size > 0
    for summary in (report["summary"], report["demo_model"]["summary"]):
        by = {s["system"]: s for s in summary}
        none, planner, greedy = by["no replication"], by["planner (bounded moves)"], by["greedy from scratch"]
        assert none["moved_per_round"] == 0 and 0 < none["balancedness_mean"] <= 1, none
        assert planner["balancedness_mean"] >= none["balancedness_mean"], (planner, none)
        assert planner["moved_per_round"] <= min(4, greedy["moved_per_round"]), (planner, greedy)


def test_deltanet_benchmark_smoke(runs):
    """benchmarks/deltanet.py at toy heads: a row per length, both methods timed, the speed-up derived from them, the
    chunked rule's outputs and end state within float32 rounding of the token-by-token twin's."""
    res = _report(runs, "deltanet")
    assert [r["tokens"] for r in res["rows"]] == [5, 70] and res["threads"] == 1 and res["cpu"], res
    for r in res["rows"]:
        assert r["recurrent_ms"] > 0 and r["chunked_ms"] > 0, r
        assert r["speedup"] == pytest.approx(r["recurrent_ms"] / r["chunked_ms"]), r
        assert r["max_abs_diff_out"] < 1e-5 and r["max_abs_diff_state"] < 1e-5, r
