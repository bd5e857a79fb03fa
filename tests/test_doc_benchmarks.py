"""The README's and docs/SECURITY.md's serving and transport tables (offline decode, serving, balance, stalls,
overload, transport, mTLS) and the prose quoting them say the figures of the committed JSON in benchmarks/results/.

Each printed number must be its JSON value rounded to the digits printed (1.64x is 1.635-1.645). In-process and
fast: it reads the documents and the JSON only (tests/doc_util.py: _json, _table, _says).
"""

from __future__ import annotations

import re

import pytest

from tests.doc_util import REPO, _json, _says, _table


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


def test_transport_ladder_table():
    """The round trip's rungs: each rung's p50 / p99 and its p50 over the raw socket's."""
    cases = _json("transport-ladder-amd-epyc.json")["cases"]
    table = _table("README.md", "| payload | socket p50 / p99 ms | frames-raw")
    assert [r[0] for r in table] == list(cases)
    rungs = ("socket", "frames-raw", "frames-codec", "frames-future", "transport")
    for row in table:
        r = cases[row[0]]
        for cell, m in zip(row[1:6], rungs):
            _says(cell, r[m]["p50_us"] / 1e3, r[m]["p99_us"] / 1e3)
        for cell, m in zip(row[6:], rungs[1:]):
            _says(cell, r[f"{m}_vs_socket_p50"])
    lo, hi = _span([c["frames-codec_vs_socket_p50"] for c in cases.values()])  # the minimal client, quoted twice
    text = " ".join((REPO / "README.md").read_text().split())
    for quote in (r"a minimal Python frame client, no futures, locks or deadlines, is ([\d.]+)-([\d.]+)x by itself, "
                  r"`transport-ladder-amd-epyc.json`",
                  r"A minimal Python frame client, with no futures, locks, deadlines or multiplexing, is already "
                  r"([\d.]+)-([\d.]+)x the raw socket"):
        m = re.search(quote, text)
        assert m, quote
        _says(f"{m.group(1)} {m.group(2)}", lo, hi)


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
