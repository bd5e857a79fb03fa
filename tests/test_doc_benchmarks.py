"""The README's and docs/SECURITY.md's benchmark tables say the figures of the committed JSON in benchmarks/results/.

Each printed number must be its JSON value rounded to the digits printed (1.64x is 1.635-1.645). In-process and
fast: it reads the documents and the JSON only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _table(doc: str, header: str, after: str = "") -> list[list[str]]:
    """The body rows (cells, `**` dropped) of the first markdown table whose header row starts with `header`,
    after the first occurrence of `after`."""
    text = (REPO / doc).read_text()
    start = text.index(after) if after else 0
    lines = text[start:].splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
    assert rows, f"{doc}: no rows under {header!r}"
    return rows


def _says(cell: str, *values: float) -> None:
    """Each number printed in `cell` is the matching value rounded to the printed digits."""
    printed = NUMBER.findall(cell)
    assert len(printed) == len(values), f"{cell!r}: {len(printed)} numbers, want {len(values)}"
    for text, value in zip(printed, values):
        digits = len(text.split(".")[1]) if "." in text else 0
        shown = float(text.replace(",", ""))
        assert abs(shown - value) <= 0.5 * 10 ** -digits + 1e-9, f"{cell!r}: {text} but the JSON says {value!r}"


def test_offline_decode_table():
    rows = {r["batch"]: r for r in _json("offline.json")["rows"]}
    table = _table("README.md", "| batch | elasticmoe `LLM.generate` tok/s")
    assert [int(r[0]) for r in table] == sorted(rows)
    for batch, ours, theirs, ratio in table:
        r = rows[int(batch)]
        _says(ours, r["elasticmoe_tok_s"])
        _says(theirs, r["transformers_tok_s"])
        _says(ratio, r["ratio"])


SERVING_SYSTEMS = {"(a) served": "served:", "(a') served": "served-port:", "(d) direct": "direct:",
                   "(b) `LLM.generate`": "LLM.generate", "(c) transformers": "transformers"}


@pytest.mark.parametrize("result,after,every_row", [
    ("serving.json", "`benchmarks/results/serving.json`", True),
    ("serving-stream.json", "`benchmarks/results/serving-stream.json`", False),  # without transformers' rows
])
def test_serving_tables(result, after, every_row):
    rows = _json(result)["rows"]
    table = _table("README.md", "| system | concurrency | output tok/s", after)
    assert len(table) == len(rows) if every_row else len(table) > 0
    for system, conc, tok_s, ttft, tpot in table:
        prefix = next(v for k, v in SERVING_SYSTEMS.items() if system.startswith(k))
        (r,) = [r for r in rows if r["system"].startswith(prefix) and r["concurrency"] == int(conc)]
        _says(tok_s, r["tok_s"])
        _says(ttft, r["ttft_p50_ms"], r["ttft_p99_ms"])
        _says(tpot, r["tpot_p50_ms"], r["tpot_p99_ms"])


def test_balance_table():
    summary = _json("balance.json")["summary"]
    table = _table("README.md", "| system | balancedness min")
    assert len(table) == len(summary)
    labels = {"no replication": "no replication", "planner (bounded moves)": "planner (bounded moves, current "
              "placement)", "greedy from scratch": "greedy replicate-then-pack from scratch"}
    assert [r[0] for r in table] == [labels[r["system"]] for r in summary]  # each row under its own label
    for (_, bmin, bmean, rel, moved), r in zip(table, summary):
        _says(bmin, r["balancedness_min"])
        _says(bmean, r["balancedness_mean"])
        _says(rel, r["relative_tokens_s"])
        _says(moved, r["moved_per_round"])


def test_stalls_table():
    rows = _json("stalls.json")["rows"]
    table = _table("README.md", "| event | failed streams")
    assert len(table) == len(rows)
    labels = {"live rebalance": "live rebalance", "shard kill (replicated)": "shard SIGKILL, every expert on 2",
              "shard kill (single copies)": "shard SIGKILL, shard holding sole",
              "controller kill": "controller SIGKILL",
              "shard pause 8 s (replicated)": "shard SIGSTOP 8 s, every expert on 2",
              "shard pause 8 s (single copies)": "shard SIGSTOP 8 s, shard holding sole",
              "gateway kill": "gateway replica SIGKILL"}
    assert all(row[0].startswith(labels[r["event"]]) for row, r in zip(table, rows)), [row[0] for row in table]
    for (_, failed, median, longest), r in zip(table, rows):
        _says(failed, r["failed_streams"])
        _says(median, r["median_gap_ms"])
        _says(longest, r["longest_gap_ms"])


OVERLOAD_HEADER = "| | proxy, 1024 calls (before) | proxy, run 1 (not recorded) | proxy, run 2 | port, run 1 (not"
OVERLOAD_COLUMNS = {"proxy, 1024 calls (before)": ("overload-max-ongoing-1024.json", "proxy"),
                    "proxy, run 2": ("overload.json", "proxy"), "port, run 2": ("overload.json", "port")}
OVERLOAD_TARGETS = {"tpot_p99_within_1.5x": "within 1.5x", "rejection_p99_le_50ms": "p99 <= 50 ms",
                    "memory_growth_le_10pct": "<= 10%", "no_crashes": "0; none"}


def _overload_cells(r: dict) -> dict[str, tuple[float, ...]]:
    """One ingress of an overload JSON as the table's rows print it (ms, %)."""
    return {"capacity, requests/s of 32 tokens (10x offered)": (r["capacity_rps"],),
            "TPOT p99 unloaded / overloaded, ms": (r["unloaded"]["tpot_p99_s"] * 1e3,
                                                   r["overload"]["tpot_p99_s"] * 1e3),
            "rejections (RESOURCE_EXHAUSTED) p50 / p99, ms": (r["overload"]["rejection_p50_s"] * 1e3,
                                                               r["overload"]["rejection_p99_s"] * 1e3),
            "gateway memory growth": (r["gateway_memory_growth"] * 100,)}


def test_overload_table():
    """The README's overload table: every column is a committed JSON's ingress, or says in its header that it is not
    recorded; the last row (crashes; other codes) and the targets are the JSON's too."""
    text = (REPO / "README.md").read_text()
    columns = [c.strip() for c in text[text.index(OVERLOAD_HEADER):].splitlines()[0].strip("|").split("|")][1:]
    table = _table("README.md", OVERLOAD_HEADER)
    assert [c for c in columns[:-1] if c not in OVERLOAD_COLUMNS] == ["proxy, run 1 (not recorded)",
                                                                       "port, run 1 (not recorded)"]
    crashes = "crashes, INTERNAL; codes other than OK and RESOURCE_EXHAUSTED"
    assert [r[0] for r in table] == [*_overload_cells(_json("overload.json")["ingresses"]["proxy"]), crashes]
    for i, column in ((i, c) for i, c in enumerate(columns, 1) if c in OVERLOAD_COLUMNS):
        name, ingress = OVERLOAD_COLUMNS[column]
        r = _json(name)["ingresses"][ingress]
        assert r["offered_rps"] == pytest.approx(10 * r["capacity_rps"])
        for row in table[:-1]:
            _says(row[i], *_overload_cells(r)[row[0]])
        codes = {c for run in (r["unloaded"], r["overload"], r["served_after"]) for c in run.get("codes", run)}
        assert table[-1][i] == f"{r['crashes']}; {', '.join(sorted(codes - {'OK', 'RESOURCE_EXHAUSTED'})) or 'none'}"
    targets = _json("overload.json")["ingresses"]["proxy"]["targets_met"]
    assert [row[-1] for row in table] == ["", *(OVERLOAD_TARGETS[k] for k in targets if k in OVERLOAD_TARGETS)]


def test_transport_table():
    modes = ("socket", "unary", "stream", "stream-default", "frames", "frames-thread")
    cases = _json("transport-amd-epyc.json")["cases"]
    table = _table("README.md", "| payload x shards | socket p50")
    assert [r[0] for r in table] == list(cases)
    for row in table:
        r = cases[row[0]]
        for cell, m in zip(row[1:7], modes):
            _says(cell, r[m]["p50_us"] / 1e3, r[m]["p99_us"] / 1e3, r[m]["gb_s"])
        _says(row[7], r["unary_vs_socket_p50"])
        _says(row[8], r["stream_vs_socket_p50"], r["stream_of_socket_gb_s"])
        _says(row[9], r["frames_vs_socket_p50"], r["frames_of_socket_gb_s"])
        _says(row[10], r["frames"]["p50_us"] / r["frames-thread"]["p50_us"])


def test_transport_unix_table():
    """The Unix socket table: each mode's p50 / p99 / GB/s, the transport over each floor of its own medium, Unix over
    TCP, and the transport over Unix against the TCP floor."""
    cases = _json("transport-unix-amd-epyc.json")["cases"]
    table = _table("README.md", "| payload x shards | socket p50 / p99 ms, GB/s | socket-unix")
    assert [r[0] for r in table] == list(cases)
    for row in table:
        r = cases[row[0]]
        for cell, m in zip(row[1:5], ("socket", "socket-unix", "frames-tcp", "frames-unix")):
            _says(cell, r[m]["p50_us"] / 1e3, r[m]["p99_us"] / 1e3, r[m]["gb_s"])
        _says(row[5], r["frames-tcp_vs_floor_p50"])
        _says(row[6], r["frames-unix_vs_floor_p50"])
        _says(row[7], r["unix_vs_tcp_p50"])
        _says(row[8], r["frames-unix_vs_socket_p50"])


def test_mtls_table():
    """docs/SECURITY.md's cost table: p50s and their ratio (mTLS p50 / plaintext p50)."""
    cases = _json("transport-mtls-amd-epyc.json")["cases"]
    table = _table("docs/SECURITY.md", "| payload | unary p50 plaintext / mTLS")
    assert [r[0] for r in table] == list(cases)
    for row in table:
        r = cases[row[0]]
        for i, kind in enumerate(("unary", "stream", "frames")):
            _says(row[1 + 2 * i], r[kind]["p50_us"] / 1e3, r[f"{kind}-mtls"]["p50_us"] / 1e3)
            _says(row[2 + 2 * i], r[f"{kind}_mtls_ratio_p50"])


def test_real_width_tables():
    res = _json("real_width-amd-epyc.json")
    ours, hf = res["elasticmoe"], res["transformers"]
    speed = _table("README.md", "| batch | elasticmoe tok/s | transformers tok/s")
    assert [r[0] for r in speed] == [str(b) for b in res["args"]["batches"]]
    for batch, o, t, ratio in speed:
        _says(o, ours["tok_s"][batch])
        _says(t, hf["tok_s"][batch])
        _says(ratio, ours["tok_s"][batch] / hf["tok_s"][batch])
    gib = 2 ** 30
    for name, load_s, anon, file, after in _table("README.md", "| | load s | peak anonymous GiB"):
        r = res[name]
        _says(load_s, r["load_s"])
        _says(anon, r["peak"]["RssAnon"] / gib)
        _says(file, r["peak"]["RssFile"] / gib)
        _says(after, r["after_load"]["RssAnon"] / gib, r["after_load"]["RssFile"] / gib)
    acc = res["accuracy"]
    table = _table("README.md", "| prompt | tokens | elasticmoe bf16")
    for i, (prompt, tokens, e, t) in enumerate(table):
        if prompt == "all":
            _says(tokens, sum(acc["tokens"]))
            _says(e, acc["elasticmoe"]["max_rel_all"], acc["elasticmoe"]["median_rel_all"])
            _says(t, acc["transformers"]["max_rel_all"], acc["transformers"]["median_rel_all"])
        else:
            assert int(prompt) == i
            _says(tokens, acc["tokens"][i])
            _says(e, acc["elasticmoe"]["max_rel"][i], acc["elasticmoe"]["median_rel"][i])
            _says(t, acc["transformers"]["max_rel"][i], acc["transformers"]["median_rel"][i])


def test_overlap_table():
    results = {(r["tokens"], r["delay_ms"]): r["schedules"] for r in _json("overlap.json")["results"]}
    for tokens, delay, *ratios in _table("README.md", "| tokens | expert latency d"):
        s = results[(int(tokens), float(delay.split()[0]))]
        for cell, schedule in zip(ratios, ("old 2", "ping-pong 2", "ping-pong 3")):
            _says(cell, s[schedule]["ratio_vs_sequential"])


def test_kernels_table():
    """benchmarks/KERNELS.md's H200 table: ours µs, % of copy bandwidth and speed-up over `_grouped_mm`."""
    summary = {(r["model"], r["tokens"]): r for r in _json("kernels-NVIDIA_H200.json")["summary"]}
    table = _table("benchmarks/KERNELS.md", "| model | T | ours µs")
    assert len(table) == len(summary)
    rows = {(r["model"], r["tokens"], r["impl"]): r for r in _json("kernels-NVIDIA_H200.json")["rows"]}
    timed = lambda r: r["us_graph"] if r.get("us_graph") is not None else r["us"]  # noqa: E731 (as kernels.py rates)
    for model, tokens, ours_us, pct, tflops, gmm_us, speedup, torch_us, err in table:
        r = summary[(model, int(tokens))]
        ours = rows[(model, int(tokens), "elasticmoe-triton")]
        gmm = rows[(model, int(tokens), "torch._grouped_mm-only")]
        _says(ours_us, r["ours_us"])
        _says(pct, r["pct_peak_bw"])
        _says(tflops, ours["tflops"])
        _says(gmm_us, timed(gmm))
        _says(speedup, r["vs_grouped_mm"])
        _says(torch_us, timed(rows[(model, int(tokens), "elasticmoe-torch")]))
        assert err == f"{ours['err']:.1e}", f"{model} T={tokens}: rel err {err}, the JSON {ours['err']:.1e}"
    faster = sum(r["vs_grouped_mm"] > 1 for r in summary.values())
    text = (REPO / "benchmarks" / "KERNELS.md").read_text()
    assert f"faster than `_grouped_mm` in {faster} of {len(summary)} rows" in text
    assert f"faster than `torch._grouped_mm` in {faster} of {len(summary)}" in (REPO / "README.md").read_text()


MLA_HEADER = "| context L | expand ms | absorbed ms | speed-up |"


def test_mla_decode_table():
    """MLA decode: per context length both reads' ms and the speed-up (expand / absorbed); the set-up, load and the
    outputs' largest difference the prose gives."""
    r = _json("mla_decode.json")
    table, a = _table("README.md", MLA_HEADER), r["args"]
    assert [int(row[0].replace(",", "")) for row in table] == [x["length"] for x in r["rows"]]
    for (_, expand, absorbed, speedup), x in zip(table, r["rows"]):
        _says(expand, x["expand_ms"])
        _says(absorbed, x["absorbed_ms"])
        _says(speedup, x["speedup"])
        assert x["speedup"] == pytest.approx(x["expand_ms"] / x["absorbed_ms"])
    text = " ".join((REPO / "README.md").read_text().split())
    assert (f"One decode group of {a['rows']} rows of L tokens each (`Attention.decode_group`, both ways in one run), "
            f"{a['heads']} heads, kv_lora_rank {a['kv_lora_rank']}, rope {a['rope']}, nope and value heads "
            f"{a['nope']}, fp32, median of {a['repeats']}") in text and a["nope"] == a["v_head_dim"]
    m = re.search(r"2 vCPUs, shared machine \(load average ([\d.]+) before and ([\d.]+) after the run; the VM", text)
    _says(f"{m.group(1)} {m.group(2)}", r["loadavg_before"][0], r["loadavg_after"][0])
    m = re.search(r"The outputs agree to (\de-\d+) \(the JSON's `max_abs_diff`, outputs up to ([\d.]+)\)", text)
    worst = max(x["max_abs_diff"] for x in r["rows"])
    assert float(m.group(1)) == float(f"{worst:.0e}") and worst < 1e-5
    _says(m.group(2), max(x["max_abs"] for x in r["rows"]))


def test_sparse_attention_table():
    """Sparse attention at decode: per context length both reads' ms, the gather's speed-up (mask / gather) and the
    indexer's ms; the outputs' largest difference the prose gives; the form measured (the engine's absorbed read)
    as the prose says."""
    result = _json("sparse_attention.json")
    rows = result["rows"]
    assert result["args"]["form"] == "absorbed"
    assert "(`Attention.decode_group`, the engine's read with `kv_b` absorbed, above)" in " ".join(
        (REPO / "README.md").read_text().split())
    table = _table("README.md", "| context L | mask ms")
    assert [int(r[0].replace(",", "")) for r in table] == [r["length"] for r in rows]
    for (_, mask, gather, speedup, index), r in zip(table, rows):
        _says(mask, r["mask_ms"])
        _says(gather, r["gather_ms"])
        _says(speedup, r["speedup"])
        _says(index, r["indexer_ms"])
        assert r["speedup"] == pytest.approx(r["mask_ms"] / r["gather_ms"])
    text = " ".join((REPO / "README.md").read_text().split())
    m = re.search(r"The speed-up approaches L / topk \((\d+)x and (\d+)x\).*? The outputs agree to (\de-\d+) \(", text)
    assert m, "the sparse-attention section's sentences moved or changed shape"
    assert [int(g) for g in m.groups()[:2]] == [r["length"] // r["topk"] for r in rows]
    worst = max(r["max_abs_diff"] for r in rows)
    assert float(m.group(3)) == float(f"{worst:.0e}") and worst < 1e-5
    # the indexer column from before the scoring went by spans (rows without indexer_read) says so, and only then
    assert all("indexer_read" in r for r in rows) == ("The indexer column predates its scoring in spans" not in text)


def _c16(name: str) -> dict[str, dict]:
    """serving JSON rows at concurrency 16 by kind: proxy, port, direct, llm."""
    kinds = {"served:": "proxy", "served-port:": "port", "direct:": "direct", "LLM.generate": "llm"}
    return {kind: r for r in _json(name)["rows"] if r["concurrency"] == 16
            for prefix, kind in kinds.items() if r["system"].startswith(prefix)}


def test_serving_prose_ratios():
    """The Serving section's sentences quoting serving.json and serving-c16.json at concurrency 16."""
    text = " ".join((REPO / "README.md").read_text().split())
    s, n = _c16("serving.json"), _c16("serving-c16.json")
    m = re.search(r"At concurrency 16, against `LLM.generate`: the proxy ([\d.]+x), the port ([\d.]+x), direct "
                  r"([\d.]+x); that night, .*?`LLM.generate` ([\d,]+) tok/s\): ([\d.]+x), ([\d.]+x) \((\d+) tok/s\), "
                  r"([\d.]+x), fan-out p50 ([\d.]+) ms served and ([\d.]+) ms direct", text)
    assert m, "the Serving section's concurrency-16 sentence moved or changed shape"
    for cell, kind in zip(m.groups()[:3], ("proxy", "port", "direct")):
        _says(cell, s[kind]["tok_s"] / s["llm"]["tok_s"])
    _says(m.group(4), n["llm"]["tok_s"])
    for cell, kind in zip((m.group(5), m.group(6), m.group(8)), ("proxy", "port", "direct")):
        _says(cell, n[kind]["tok_s"] / n["llm"]["tok_s"])
    _says(m.group(7), n["port"]["tok_s"])
    _says(m.group(9), _json("serving-c16.json")["fanout"]["fanout_overhead_p50_s"] * 1e3)
    _says(m.group(10), n["direct"]["fanout_p50_ms"])
    m = re.search(r"socket \*\*p50 ([\d.]+) ms, p99 ([\d.]+) ms\*\* in this run", text)
    fanout = _json("serving.json")["fanout"]
    _says(m.group(1), fanout["fanout_overhead_p50_s"] * 1e3)
    _says(m.group(2), fanout["fanout_overhead_p99_s"] * 1e3)
    m = re.search(r"`direct_grpc` port ([\d.]+x) in `serving.json` and ([\d.]+x) in `serving-c16.json`", text)
    _says(m.group(1), s["port"]["tok_s"] / s["direct"]["tok_s"])
    _says(m.group(2), n["port"]["tok_s"] / n["direct"]["tok_s"])
    m = re.search(r"served through the proxy is ([\d.]+)-([\d.]+)x of direct", text)
    ratios = sorted(r["proxy"]["tok_s"] / r["direct"]["tok_s"] for r in (s, n))
    _says(m.group(1), ratios[0])
    _says(m.group(2), ratios[1])


def _span(values) -> tuple[float, float]:
    return min(values), max(values)


def test_status_row_quotes_the_committed_transport_run():
    """The Status table's fan-out row: the socket transport's >= 1 MiB GB/s share and <= 64 KiB p50 ratio, first
    the committed run's range (transport-amd-epyc.json), then the earlier runs' that the Transport section names."""
    cases = _json("transport-amd-epyc.json")["cases"]
    big = [c for k, c in cases.items() if "MiB" in k]
    small = [c for k, c in cases.items() if k.startswith(("16 KiB", "64 KiB"))]
    text = " ".join((REPO / "README.md").read_text().split())
    m = re.search(r"the socket transport meets the >= 1 MiB throughput target \(([\d.]+)-([\d.]+) of the raw socket's "
                  r"GB/s in `transport-amd-epyc.json`, ([\d.]+)-([\d.]+) in two earlier runs\); <= 64 KiB round trips "
                  r"are ([\d.]+)-([\d.]+)x the raw socket's p50 \(([\d.]+)-([\d.]+)x in the earlier runs;", text)
    assert m, "the Status table's fan-out row does not quote the committed transport run"
    lo, hi = _span([c["frames_of_socket_gb_s"] for c in big])
    _says(f"{m.group(1)} {m.group(2)}", lo, hi)
    lo, hi = _span([c["frames_vs_socket_p50"] for c in small])
    _says(f"{m.group(5)} {m.group(6)}", lo, hi)
    # the earlier runs' ranges are the union of those the Transport section gives
    assert f"({m.group(1)}-{m.group(2)}; 0.73-1.28 and 0.66-0.97 in earlier runs)" in text
    assert (m.group(3), m.group(4)) == ("0.66", "1.28")
    assert f"{m.group(5)}-{m.group(6)}x, 2.16-2.99x and 2.39-3.52x in earlier runs" in text
    assert (m.group(7), m.group(8)) == ("2.16", "3.52")


def test_kernels_split_share():
    """benchmarks/KERNELS.md: gate_up's share of the per-kernel split, the range over the rows and the T=1 outliers."""
    shares = {(r["model"], r["tokens"]): r["split_us"]["gate_up"] / sum(r["split_us"].values())
              for r in _json("kernels-NVIDIA_H200.json")["rows"] if r["impl"] == "elasticmoe-triton-split"}
    text = " ".join((REPO / "benchmarks" / "KERNELS.md").read_text().split())
    m = re.search(r"In the per-kernel split gate_up takes (\d+)-(\d+)% of the time \(of the four kernels' sum\) but "
                  r"in two T=1 rows that move little: Qwen3, (\d+)%, and the EP8 shard, (\d+)%", text)
    assert m, "KERNELS.md's gate_up share sentence moved or changed shape"
    outliers = {("qwen3-30b-a3b", 1): m.group(3), ("deepseek-v3-ep8", 1): m.group(4)}
    rest = [100 * s for key, s in shares.items() if key not in outliers]
    _says(f"{m.group(1)} {m.group(2)}", min(rest), max(rest))
    for key, printed in outliers.items():
        _says(printed, 100 * shares[key])


DELTANET_HEADER = "| prompt tokens | token by token ms | chunked ms | speed-up |"


def test_deltanet_table():
    """Gated DeltaNet prefill: the table's times and speed-ups, and the set-up and agreement its paragraph gives."""
    r = _json("deltanet-amd-epyc.json")
    table = _table("README.md", DELTANET_HEADER)
    assert [int(row[0]) for row in table] == [x["tokens"] for x in r["rows"]]
    for (_, rec, chunked, speedup), x in zip(table, r["rows"]):
        _says(rec, x["recurrent_ms"])
        _says(chunked, x["chunked_ms"])
        _says(speedup, x["speedup"])
    a, text = r["args"], " ".join((REPO / "README.md").read_text().split())
    assert (f"{a['k_heads']} key heads x {a['head_dim']} repeated to {a['v_heads']} value heads x {a['head_dim']}, "
            f"float32, {r['threads']} thread, best of {a['repeats']}") in text
    m = re.search(r"shared \(load average ([\d.]+) before and ([\d.]+) after the run, on 2 vCPUs\)", text)
    _says(f"{m.group(1)} {m.group(2)}", r["loadavg_before"], r["loadavg_after"])
    m = re.search(r"which put the wall times ([\d.]+)-([\d.]+)x above them", text)
    walls = [x[f"{k}_wall_ms"] / x[f"{k}_ms"] for x in r["rows"] for k in ("recurrent", "chunked")]
    _says(f"{m.group(1)} {m.group(2)}", min(walls), max(walls))
    m = re.search(r"the chunked outputs and end states within ([\d.]+)e-(\d+) of the twin's", text)
    worst = max(max(x["max_abs_diff_out"], x["max_abs_diff_state"]) for x in r["rows"])
    assert worst <= float(f"{m.group(1)}e-{m.group(2)}") < 10 * worst, (m.groups(), worst)
