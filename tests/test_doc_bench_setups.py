"""The README's benchmark set-ups (model shapes, limits, rounds) are those the committed JSON in benchmarks/results/
records, and the Status table's serving ranges hold the committed runs' figures (tests/test_doc_benchmarks.py and
test_doc_bench_compute.py check the tables' figures)."""

from __future__ import annotations

import ast
import json
import re

from tests.doc_util import REPO

README = " ".join((REPO / "README.md").read_text().split())
RESULTS = REPO / "benchmarks" / "results"


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _c16(name: str) -> dict[str, dict]:
    """A serving JSON's concurrency-16 rows by kind: proxy, port, direct, llm."""
    kinds = {"served:": "proxy", "served-port:": "port", "direct:": "direct", "LLM.generate": "llm"}
    return {kind: r for r in _json(name)["rows"] if r["concurrency"] == 16
            for prefix, kind in kinds.items() if r["system"].startswith(prefix)}


def test_offline_serving_and_overlap_set_ups():
    """Offline decode, Serving (all four serving JSON) and Overlap: the shapes the sections give."""
    a = _json("offline.json")["meta"]["args"]
    said = (f"Mixtral-like, {a['layers']} layers × {a['experts']} experts, hidden {a['hidden']}, expert intermediate "
            f"{a['intermediate']}, fp32, CPU, greedy, decode tokens/s")
    assert said in README
    for name in ("serving.json", "serving-c16.json", "serving-stream.json", "serving-engine-port.json"):
        a = _json(name)["args"]
        said = (f"Mixtral-like, {a['layers']} layers × {a['experts']} experts, hidden {a['hidden']}, expert "
                f"intermediate {a['intermediate']}, fp32, {a['tokens']} output tokens per request")
        assert said in README, name
        assert a.get("dtype", "float32") == "float32" and a.get("device", "cpu") == "cpu", name
    assert _json("serving-stream.json")["args"]["transport"] == "stream"
    a = _json("overlap.json")["meta"]["args"]
    assert (a["family"], a["layers"], a["hidden"], a["threads"], a["repeats"]) == ("qwen2_moe", 4, 512, 1, 12)
    assert "Qwen2-MoE-like, 4 layers, hidden 512, 1 thread" in README and "median of 12" in README


def test_elasticity_overload_real_width_and_transport_set_ups():
    a = _json("balance.json")["args"]
    assert (f"Planner, {a['layers']} MoE layers × {a['experts']} experts on {a['shards']} shards × "
            f"{a['slots']} slots, Zipf {a['zipf']} loads drifting for {a['rounds']} rounds ({a['swaps']} swaps of hot "
            "and cold") in README
    moved = {r["system"]: r["moved_per_round"] for r in _json("balance.json")["summary"]}
    times = round(moved["greedy from scratch"] / moved["planner (bounded moves)"])
    assert f"while moving {times}x fewer weights" in README
    o = _json("overload.json")
    lim = o["limits"]
    assert o["model"] == "tiny mixtral, 2 layers x 8 experts, 2 shards" and o["tokens_per_request"] == 32
    assert (f"Tiny Mixtral (2 layers), 2 shards, gateway limits {lim['max_num_seqs']} running + {lim['max_queue']} "
            f"waiting, Serve's `max_queued_requests` {lim['max_queued_requests']}") in README
    assert {i["overload"]["seconds"] for i in o["ingresses"].values()} == {30.0}
    assert "offer 10x that for 30 s" in README
    a = _json("real_width-amd-epyc.json")["args"]
    assert (a["layers"], a["new_tokens"], a["repeats"]) == (2, 16, 2)
    assert "cut to 2 layers" in README and "batch x 15 / (t(16 tokens) - t(1 token)), best of 2" in README
    source = (REPO / "benchmarks" / "real_width.py").read_text()
    w = ast.literal_eval(re.search(r"^WIDTH = (\{.*?\})$", source, flags=re.M | re.S).group(1))
    assert (f"hidden {w['hidden']}, {w['experts']} experts, expert FFN {w['intermediate']}, top-{w['top_k']}, "
            f"{w['heads']}/{w['kv_heads']} heads") in README and w["family"] == "qwen3_moe"
    t = _json("transport-amd-epyc.json")
    assert {k.split(" x ")[1] for k in t["cases"]} == {"1", "2", "4"}
    assert "fanned out to 1, 2 and 4 echo shards" in README
    before, after = t["loadavg_before"][0], t["loadavg_after"][0]
    assert f"grpc {t['grpc']}, load average {before:.1f} before and {after:.1f} after the run" in README


def test_sparse_attention_set_up():
    """Sparse attention at decode: the group, the MLA and indexer shapes, the repeats and the machine's load."""
    r = _json("sparse_attention.json")
    a = r["args"]
    assert (a["nope"], a["v_head_dim"]) == (128, 128) and r["cpu"] == "AMD EPYC" and r["cpus"] == 2
    assert (f"for a group of {a['rows']} rows of L tokens each, {a['heads']} heads, kv_lora_rank {a['kv_lora_rank']}, "
            f"rope {a['rope']}, nope and value heads 128, index_topk {a['topk']} (DeepSeek-V3.2's), fp32, median of "
            f"{a['repeats']}, AMD EPYC, 2 vCPUs, a quiet machine (load average {r['loadavg_before'][0]:.1f} before "
            f"and {r['loadavg_after'][0]:.1f} after the run") in README
    assert f"scoring of all L index keys ({a['index_heads']} heads of {a['index_dim']}, the same for both)" in README
    assert all(row["topk"] == a["topk"] and row["rows"] == a["rows"] for row in r["rows"])


def _range(pattern: str) -> tuple[float, float]:
    m = re.search(pattern, README)
    assert m, f"the Status table's fan-out row no longer says {pattern!r}"
    return float(m.group(1)), float(m.group(2))


def test_the_status_rows_serving_ranges_hold_the_committed_runs():
    """The Status table's fan-out row: the ranges it gives for 2026-12-04's committed runs (serving.json,
    serving-c16.json) hold their concurrency-16 figures, to the digits printed; the direct design's fan-out range
    once left out serving-c16.json's 0.95 ms."""
    runs = [_c16("serving.json"), _c16("serving-c16.json")]
    fanout = [_json(n)["fanout"]["fanout_overhead_p50_s"] * 1e3 for n in ("serving.json", "serving-c16.json")]
    checks = [
        (r"is ([\d.]+)-([\d.]+)x `LLM.generate` through the `direct_grpc` port", [r["port"]["tok_s"] / r["llm"]["tok_s"]
                                                                                for r in runs]),
        (r"and ([\d.]+)-([\d.]+)x through Serve's proxy in 2026-12-04's runs", [r["proxy"]["tok_s"] / r["llm"]["tok_s"]
                                                                              for r in runs]),
        (r"([\d.]+)-([\d.]+) ms in the evening's and the night's runs \(`serving.json`, `serving-c16.json`\)", fanout),
        (r"reaches ([\d.]+)-([\d.]+)x with a fan-out p50", [r["direct"]["tok_s"] / r["llm"]["tok_s"] for r in runs]),
        (r"with a fan-out p50 of ([\d.]+)-([\d.]+) ms", [r["direct"]["fanout_p50_ms"] for r in runs]),
    ]
    for pattern, values in checks:
        lo, hi = _range(pattern)
        assert all(lo - 0.005 <= v <= hi + 0.005 for v in values), (pattern, lo, hi, values)


def test_the_served_steps_against_direct_are_the_committed_runs():
    """Serving: "the served gateway's steps still take 1.4-2.0x as long as the same engine's without Ray (TPOT p50
    through the port ... against ... direct in serving.json and serving-c16.json)": it said "about twice as long
    (TPOT 47-48 against 23-25 ms)", which serving-c16.json's port (33.6 ms) did not bear out."""
    runs = [_c16("serving.json"), _c16("serving-c16.json")]
    m = re.search(r"take ([\d.]+)-([\d.]+)x as long as the same engine's without Ray \(TPOT p50 through the port "
                  r"([\d.]+) and ([\d.]+) ms against ([\d.]+) and ([\d.]+) ms direct in `serving.json` and "
                  r"`serving-c16.json`\)", README)
    assert m, "the Serving section's served-against-direct TPOT sentence moved or changed shape"
    port, direct = [r["port"]["tpot_p50_ms"] for r in runs], [r["direct"]["tpot_p50_ms"] for r in runs]
    printed = [float(g) for g in m.groups()]
    assert printed[2:4] == [round(v, 1) for v in port] and printed[4:6] == [round(v, 1) for v in direct]
    ratios = sorted(p / d for p, d in zip(port, direct))
    assert printed[:2] == [round(ratios[0], 1), round(ratios[1], 1)]


def _pingpong_ratios(name: str) -> list[float]:
    return [s["ratio_vs_sequential"] for r in _json(name)["results"] for k, s in r["schedules"].items()
            if k.startswith("ping-pong")]


def test_micro_batches_on_cpu_never_paid_off_in_the_recorded_runs():
    """Architecture and Overlap: on CPU a step in 2 or 3 micro-batches took longer than the whole step in every
    recorded case. The README said ping-pong hides latency "only where the dense work shrinks with the tokens (large
    steps)" and costs more "for small decode steps": overlap_t256.json, which it cites, has 256-token steps slower
    too."""
    both = _pingpong_ratios("overlap.json") + _pingpong_ratios("overlap_t256.json")
    big = _pingpong_ratios("overlap_t256.json")
    assert min(both) > 1.0
    assert (f"from 16 to 256 tokens, a step in 2 or 3 micro-batches took {min(both):.2f}-{max(both):.2f}x the time of "
            "the whole step") in README
    assert f"also at 256 tokens (`benchmarks/results/overlap_t256.json`: {min(big):.2f}-{max(big):.2f}x)" in README
    assert {r["tokens"] for n in ("overlap.json", "overlap_t256.json") for r in _json(n)["results"]} == {16, 64, 256}


def test_the_engine_port_rows_first_run_is_the_committed_one():
    """Serving, row (e): "Two runs at concurrency 16: 0.42x and 0.45x `LLM.generate` (478 and 426 tok/s), against
    0.46x and 0.54x for (d) without the port and 0.32x and 0.46x served through the port": the first of each pair is
    serving-engine-port.json's."""
    rows = {r["system"].split(":")[0]: r["tok_s"] for r in _json("serving-engine-port.json")["rows"]}
    llm = next(v for k, v in rows.items() if k.startswith("LLM.generate"))
    m = re.search(r"Two runs at concurrency 16: ([\d.]+)x and [\d.]+x `LLM.generate` \((\d+) and \d+ tok/s\), against "
                  r"([\d.]+)x and [\d.]+x for \(d\) without the port and ([\d.]+)x and [\d.]+x served through the port",
                  README)
    assert m, "the engine-port sentence moved or changed shape"
    assert m.group(1) == f"{rows['engine-port'] / llm:.2f}" and m.group(2) == f"{rows['engine-port']:.0f}"
    assert m.group(3) == f"{rows['direct'] / llm:.2f}" and m.group(4) == f"{rows['served-port'] / llm:.2f}"


def test_the_status_rows_failed_streams_are_the_stalls_runs():
    """The Status table's fault-tolerance row said "0 failed streams" while stalls.json (the Served faults table) had
    4 on the gateway kill; since the resuming client's run no fault loses a stream, and the row must say so."""
    rows = _json("stalls.json")["rows"]
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| fault tolerance"))
    lost = {r["event"] for r in rows if r["failed_streams"]}
    assert lost == set() and "0 failed streams in every fault of `stalls.json`" in row, lost
    assert "`stalls.json`" in row
