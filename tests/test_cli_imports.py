"""`elasticmoe --help`, each command's --help, its usage errors and the commands that need no model import neither
torch nor transformers (about 4 s before the first line was printed): each runs in a fresh interpreter here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.moe_cases import REPO

HEAVY = ("torch", "transformers")
# `python -m elasticmoe ARGS` in this interpreter, then the heavy modules it imported, on stdout's last line
RUN_MODULE = """
import runpy, sys
sys.argv = ["elasticmoe", *{args!r}]
try:
    runpy.run_module("elasticmoe", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
else:
    code = 0
print()
print(code, sorted(m for m in {heavy!r} if m in sys.modules))
"""
SUBCOMMANDS = ("demo", "generate", "status", "scale", "offline", "make-tiny-model")


def _run(args: list[str]) -> tuple[str, str, str]:
    """(exit code, heavy modules imported, stdout + stderr before them) of `python -m elasticmoe ARGS`."""
    code = RUN_MODULE.format(args=args, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, last = proc.stdout.rstrip("\n").rsplit("\n", 1)
    status, heavy = last.split(" ", 1)
    return status, heavy, head + proc.stderr


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in SUBCOMMANDS)], ids=" ".join)
def test_help_imports_no_torch(args):
    status, heavy, out = _run(args)
    assert status == "0" and out.startswith(f"usage: elasticmoe{' ' + args[0] if len(args) > 1 else ''}"), out
    assert heavy == "[]", (heavy, out)


@pytest.mark.parametrize("args, says", [
    (["make-tiny-model", "--family", "llama", "--out", "x"], "argument --family: invalid choice: 'llama'"),
    (["make-tiny-model", "--family", "mixtral", "--out", "x", "--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    (["make-tiny-model", "--family", "mixtral", "--out", "x", "--layout", "zz"], "--layout: invalid choice: 'zz'"),
    (["make-tiny-model", "--family", "mixtral", "--out", "x", "--max-shard-size", "abc"],
     "'abc' is not a size like '200KB'"),
    (["status", "--interval", "1"], "--interval: only with --watch"),
    (["scale", "--shards", "0"], "--shards: must be at least 1"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:3]))
def test_usage_errors_import_no_torch(args, says):
    """A refused flag (the tiny model's choices included) is refused as before, with no model module loaded."""
    status, heavy, out = _run(args)
    assert status == "2" and says in out and "Traceback" not in out, out
    assert heavy == "[]", (heavy, out)


def test_generate_against_no_server_imports_no_torch():
    """`elasticmoe generate` talks gRPC only: with nothing listening it fails (UNAVAILABLE), having loaded no model
    module (port 1 on 127.0.0.1: connection refused at once)."""
    status, heavy, out = _run(["generate", "hi", "--address", "127.0.0.1:1", "--timeout", "5"])
    assert status == "1" and "elasticmoe generate: error: UNAVAILABLE" in out, out
    assert heavy == "[]", (heavy, out)
