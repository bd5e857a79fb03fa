"""Every figure table in README.md, benchmarks/KERNELS.md and docs/*.md is checked against a committed result or says
it is not recorded, and the README's list of result JSONs gives each one's machine and date as recorded (or, with no
date recorded, the commit date from git)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import subprocess

from tests import test_doc_bench_compute, test_doc_benchmarks
from tests.doc_util import NUMBER, REPO, RESULTS, _json, _says, _table
from tests.test_doc_bench_compute import DELTANET_HEADER, MLA_HEADER
from tests.test_doc_benchmarks import OVERLOAD_HEADER

DOCS = ["README.md", "benchmarks/KERNELS.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
BENCH = (test_doc_benchmarks, test_doc_bench_compute)  # where the tests CHECKED names are (besides this module)
RESULTS_HEADER = "| result JSON | machine, as the JSON records it | run date |"
# (doc, header, text before it or "") -> the test that checks every figure of that table
CHECKED = {
    ("README.md", RESULTS_HEADER, ""): "test_results_list",
    ("README.md", "| batch | elasticmoe `LLM.generate` tok/s", ""): "test_offline_decode_table",
    ("README.md", "| system | concurrency | output tok/s", "`benchmarks/results/serving.json`"): "test_serving_tables",
    ("README.md", "| system | concurrency | output tok/s", "`benchmarks/results/serving-stream.json`"):
        "test_serving_tables",
    ("README.md", "| system | balancedness min", ""): "test_balance_table",
    ("README.md", "| event | failed streams", ""): "test_stalls_table",
    ("README.md", OVERLOAD_HEADER, ""): "test_overload_table",  # and its unrecorded columns say so
    ("README.md", "| payload x shards | socket p50", ""): "test_transport_table",
    ("README.md", "| payload x shards | socket p50 / p99 ms, GB/s | socket-unix", ""): "test_transport_unix_table",
    ("README.md", "| payload | socket p50 / p99 ms | frames-raw", ""): "test_transport_ladder_table",
    ("README.md", "| batch | elasticmoe tok/s | transformers tok/s", ""): "test_real_width_tables",
    ("README.md", "| | load s | peak anonymous GiB", ""): "test_real_width_tables",
    ("README.md", "| prompt | tokens | elasticmoe bf16", ""): "test_real_width_tables",
    ("README.md", "| tokens | expert latency d", ""): "test_overlap_table",
    ("README.md", "| context L | mask ms", ""): "test_sparse_attention_table",
    ("README.md", MLA_HEADER, ""): "test_mla_decode_table",
    ("README.md", DELTANET_HEADER, ""): "test_deltanet_table",
    ("benchmarks/KERNELS.md", "| model | T | ours µs", ""): "test_kernels_table",
    ("docs/SECURITY.md", "| payload | unary p50 plaintext / mTLS", ""): "test_mtls_table",
}
NOT_RECORDED = {("benchmarks/KERNELS.md", "| model (E, H, I, k)"): "no JSON committed; its 1.4-7x is checked"}
NOT_RESULTS = {  # tables whose numbers are names, versions, ports or prose, not measurements
    ("README.md", "| package | role |"): "the package layout",
    ("README.md", "| `model_type` |"): "model families and their tests",
    ("README.md", "| area | state |"): "the Status table: prose per area",
    ("docs/DEPLOY.md", "| Where |"): "deployment files",
    ("docs/SECURITY.md", "| Plane |"): "ports and protections",
    ("docs/SECURITY.md", "| Deployment |"): "certificate set-up",
}
DATED = re.compile(r"\b(\d{4}-\d{2}-\d{2})(?![\d-])")  # also machine.stamp()'s ISO 2026-12-06T19:37:07+0000
UNDATED = re.compile(r"not recorded; committed (\d{4}-\d{2}-\d{2}) \(`([0-9a-f]{7,40})`(?:, as `([\w.-]+)`)?\)")


def _tables(doc: str) -> list[tuple[int, str]]:
    """(line index, header row) of every markdown table in `doc` with a digit in its body."""
    lines = (REPO / doc).read_text().splitlines()
    out = []
    for i in range(len(lines) - 1):
        if not (lines[i].startswith("|") and re.fullmatch(r"\|[\s:|-]+", lines[i + 1])):
            continue
        j = i + 2
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if re.search(r"\d", "".join(lines[i + 2:j])):
            out.append((i, lines[i]))
    return out


def _scanned() -> list[tuple[str, object]]:
    """The names defined in the modules of BENCH and this one: the tests CHECKED names and their constants."""
    return [*(item for module in BENCH for item in vars(module).items()), *globals().items()]


def _mentions(source: str, text: str) -> bool:
    """Whether a test's source names `text`, itself or as a module constant holding it."""
    constants = {k for k, v in _scanned() if k.isupper() and v == text}
    return text in source or any(re.search(rf"\b{k}\b", source) for k in constants)


def _located(doc: str, header: str, after: str) -> int:
    """The line index of the table _table reads for (doc, header, after)."""
    text = (REPO / doc).read_text()
    start = text[:text.index(after)].count("\n") if after else 0
    return next(n for n, line in enumerate(text.splitlines()) if n >= start and line.startswith(header))


def test_every_figure_table_is_checked_or_says_not_recorded():
    """Each table with a digit in its body is read by the test CHECKED names (which must name its header), or is
    introduced as not recorded, or is listed as no results table; no entry is stale and none is claimed twice."""
    named = [(name, fn) for name, fn in _scanned() if name.startswith("test_") and callable(fn)]
    tests = {name: inspect.getsource(fn) for name, fn in named}
    assert len(tests) == len(named), "a test name in two of the scanned modules: CHECKED could name either"
    for (doc, header, after), name in CHECKED.items():  # the named test reads that table
        assert _mentions(tests[name], header) and (not after or _mentions(tests[name], after)), (name, header)
    where = {}
    for (doc, header, after), name in CHECKED.items():
        where.setdefault((doc, _located(doc, header, after)), []).append(name)
    for kind, table in (("not recorded", NOT_RECORDED), ("not results", NOT_RESULTS)):
        for doc, header in table:
            where.setdefault((doc, _located(doc, header, "")), []).append(kind)
    found = {(doc, i): header for doc in DOCS for i, header in _tables(doc)}
    assert {k: h for k, h in found.items() if k not in where} == {}, "tables with figures no test checks"
    assert [k for k in where if k not in found] == [], "entries that match no table with figures"
    assert all(len(set(v)) == 1 for v in where.values()), where
    for doc, header in NOT_RECORDED:  # the paragraph that introduces it says so
        lines = (REPO / doc).read_text().splitlines()
        i = _located(doc, header, "")
        assert "not recorded" in " ".join(lines[i - 5:i]).lower(), f"{doc}: the table {header!r} hides that"


def test_kernels_cpu_table_gives_its_range():
    """KERNELS.md's CPU table (not recorded): the torch path's 1.4-7x over the loop for small or many experts is what
    its rows for 64 and 128 experts give."""
    table = _table("benchmarks/KERNELS.md", "| model (E, H, I, k)")
    rows = {r[0]: [float(c) for c in r[1:]] for r in table}
    ratios = [loop / torch for name, torch_us in rows.items() if name.endswith(": torch") and not name.startswith("8,")
              for loop, torch in zip(rows[name.replace(": torch", ": loop")], torch_us)]
    assert len(ratios) == 8
    text = " ".join((REPO / "benchmarks" / "KERNELS.md").read_text().split())
    m = re.search(r"pays off where per-op overhead dominates \(small or many experts\): ([\d.]+)-([\d.]+)x", text)
    _says(f"{m.group(1)} {m.group(2)}", min(ratios), max(ratios))


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, f"git {' '.join(args)}: {out.stderr.strip()} (this test needs the full git history)"
    return out.stdout.strip()


def _machine(r: dict) -> str:
    """What a result JSON records about its machine, as the README's list prints it."""
    if "machine" in r:
        return r["machine"]
    meta = r.get("meta", {})
    cpu, cpus = r.get("cpu") or meta.get("cpu"), r.get("cpus") or meta.get("cpus") or meta.get("nproc")
    name = cpu or meta["machine"]
    text = f"{name}, {cpus} CPUs" if cpus else f"{name}, CPU count not recorded"
    return text if cpu else f"{text} (CPU model not recorded)"


def _run_date(r: dict) -> str | None:
    """The run's date as the JSON records it (machine.stamp's, overlap.py's meta, the GPU run's machine line)."""
    m = DATED.search(r.get("date") or r.get("meta", {}).get("date") or r.get("machine") or "")
    return m and m.group(1)


def test_a_stamped_run_date_is_read():
    """machine.stamp()'s ISO date (2026-12-06T19:37:07+0000) is a run date: the word boundary after the day, which
    overlap.py's '2026-12-03 12:02:46' has, is not there before the 'T'."""
    spec = importlib.util.spec_from_file_location("bench_machine", REPO / "benchmarks" / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    stamped = machine.stamp()
    assert _run_date(stamped) == stamped["date"][:10]
    assert _run_date({"meta": {"date": "2026-12-03 12:02:46"}}) == "2026-12-03"


def test_results_list():
    """One row per result JSON: its machine as recorded; its run date as recorded, else 'not recorded' with the date
    of the first commit that held the file's bytes as they are now (at that path, or the one named with 'as')."""
    results = RESULTS
    rows = _table("README.md", RESULTS_HEADER)
    assert [r[0] for r in rows] == [f"`{p.name}`" for p in sorted(results.glob("*.json"))]
    for name, machine, date in rows:
        path = results / name.strip("`")
        r = json.loads(path.read_text())
        assert machine == _machine(r), name
        if _run_date(r):
            assert date == _run_date(r), name
            continue
        m = UNDATED.fullmatch(date)
        assert m, f"{name}: no run date in the JSON, so the row must say 'not recorded; committed <date> (`<commit>`)'"
        day, commit, was = m.groups()
        at = f"benchmarks/results/{was or path.name}"
        blob = _git("hash-object", str(path))
        assert _git("rev-parse", f"{commit}:{at}") == blob, f"{name} is not {at} as of {commit}"
        before = subprocess.run(["git", "rev-parse", "-q", "--verify", f"{commit}^:{at}"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        assert before != blob, f"{name}: {commit} is not the first commit that held it"
        assert _git("log", "-1", "--format=%cs", commit) == day, name


def test_overload_prose():
    """The sentences under the overload table: run 2's figures from overload.json, run 1's from its (not recorded)
    columns, the 1024-call run's from overload-max-ongoing-1024.json; the morning's first run says it is not
    recorded."""
    rows = _table("README.md", OVERLOAD_HEADER)[:-1]  # the figures' rows, not crashes and codes
    # a run 1 column's figures in order: capacity, TPOT p99 unloaded, overloaded, rejection p50, p99, memory growth %
    run1 = {ingress: [float(x) for row in rows for x in NUMBER.findall(row[column])]
            for ingress, column in (("proxy", 2), ("port", 4))}
    new, old = _json("overload.json")["ingresses"], _json("overload-max-ongoing-1024.json")["ingresses"]
    text = " ".join((REPO / "README.md").read_text().split())
    m = re.search(
        r"two targets are met in both runs \(TPOT p99 ([\d.]+x) and ([\d.]+x) the unloaded run's, memory growth "
        r"([\d.]+)-([\d.]+)%\) and the rejection p99 is not \((\d+)-(\d+) ms; p50 (\d+) ms\): every refusal is "
        r"Serve's own \(`(.*?)`, .*?which at (\d+)-\d+ requests/s \(the first column, and the morning's first run, "
        r"not recorded\) saturated the machine: refusals took \d+-(\d+) s and the accepted streams slowed (\d+)-\d+x\. "
        r".*?neither run met the TPOT and rejection targets \(([\d.]+)-([\d.]+)x, (\d+)-(\d+) ms p99\) while the "
        r"morning's first run, on a quieter machine and not recorded, met all of them .*?offers (\d+)-(\d+) requests/s",
        text)
    assert m, "the Overload section's sentences moved or changed shape"
    g = m.groups()
    (tpot0, tpot1), rej99, memory = run1["proxy"][1:3], run1["proxy"][4], run1["proxy"][5]
    _says(g[0], tpot1 / tpot0)
    _says(g[1], new["proxy"]["tpot_p99_ratio"])
    _says(f"{g[2]} {g[3]}", *sorted((memory, new["proxy"]["gateway_memory_growth"] * 100)))
    _says(f"{g[4]} {g[5]}", *sorted((rej99, new["proxy"]["overload"]["rejection_p99_s"] * 1e3)))
    _says(f"{g[6]} {g[6]}", run1["proxy"][3], new["proxy"]["overload"]["rejection_p50_s"] * 1e3)
    assert g[7] == new["proxy"]["overload"]["details"]["RESOURCE_EXHAUSTED"]
    _says(g[8], old["proxy"]["offered_rps"])
    _says(g[9], old["proxy"]["overload"]["rejection_p99_s"])
    _says(g[10], old["proxy"]["overload"]["tpot_p99_s"] / old["proxy"]["unloaded"]["tpot_p99_s"])
    port1 = run1["port"]
    _says(f"{g[11]} {g[12]}", *sorted((port1[2] / port1[1], new["port"]["tpot_p99_ratio"])))
    _says(f"{g[13]} {g[14]}", *sorted((port1[4], new["port"]["overload"]["rejection_p99_s"] * 1e3)))
    _says(f"{g[15]} {g[16]}", *sorted((10 * port1[0], new["port"]["offered_rps"])))
    assert f"(the gateway's own admission: `{new['port']['overload']['details']['RESOURCE_EXHAUSTED']}`)" in text
    assert f"rejection p99 {g[4]}-{g[5]} ms (target 50)" in text  # the Status table's front-door row
