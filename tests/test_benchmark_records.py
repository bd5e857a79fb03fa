"""Every benchmark's result JSON records its run: CPU model and count, date, settings (static checks, nothing run)."""

from __future__ import annotations

import ast
import importlib.util
import time

from tests.moe_cases import REPO

BENCH = REPO / "benchmarks"
NOT_RESULTS = {"tune_moe.py": "writes a tile table for elasticmoe/kernels/tuning.py, keyed by token count only"}
SETTINGS_KEYS = {"args", "settings"}


def _writes_json(fn: ast.AST) -> bool:
    """Whether a function writes JSON to a file: json.dump(...) or <path>.write_text(json.dumps(...))."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "dump" and getattr(node.func.value, "id", "") == "json":
                return True
            if node.func.attr == "write_text" and node.args and "json.dumps" in ast.unparse(node.args[0]):
                return True
    return False


def record_gaps(source: str) -> list[str]:
    """What a script that writes JSON leaves out: a machine.stamp() call (CPU, count, date) or a settings key."""
    tree = ast.parse(source)
    writers = [fn.name for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
               and _writes_json(fn)]
    if not writers:
        return []
    calls = {getattr(n.func, "id", getattr(n.func, "attr", "")) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    keys = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    gaps = [] if "stamp" in calls else [f"{writers[0]} writes JSON without machine.stamp() (CPU model, count, date)"]
    return gaps + ([] if keys & SETTINGS_KEYS else [f"{writers[0]} writes JSON without an 'args' or 'settings' entry"])


def test_stamp_records_the_cpu_its_count_and_the_date():
    spec = importlib.util.spec_from_file_location("bench_machine", BENCH / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    s = machine.stamp()
    assert s["cpu"] and s["cpus"] >= 1
    assert time.strptime(s["date"], "%Y-%m-%dT%H:%M:%S%z").tm_year >= 2026


def test_every_result_json_records_its_run():
    scripts = [p for p in sorted(BENCH.glob("*.py")) if p.name not in NOT_RESULTS]
    writers = [p.name for p in scripts if any(_writes_json(n) for n in ast.walk(ast.parse(p.read_text())))]
    assert len(writers) >= 9, writers  # balance, kernels, offline, overlap, overload, real_width, rpc_fanout, ...
    gaps = [f"{p.name}: {g}" for p in scripts for g in record_gaps(p.read_text())]
    assert gaps == []
    for name in writers:  # and each prints what it measured too
        assert "print(" in (BENCH / name).read_text(), name


def test_the_record_check_finds_what_is_left_out():
    bare = "import json\ndef main(a, out):\n    out.write_text(json.dumps({'cpu': 'x', 'rows': []}))\n"
    assert record_gaps(bare) == ["main writes JSON without machine.stamp() (CPU model, count, date)",
                                 "main writes JSON without an 'args' or 'settings' entry"]
    whole = "import json\ndef main(a, f):\n    json.dump({**stamp(), 'args': vars(a)}, f)\n"
    assert record_gaps(whole) == []
