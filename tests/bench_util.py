"""Running benchmarks/ code in a child python, as the scripts run (their folder the working directory), offline."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.moe_cases import REPO


def snippet(code: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -c code` in benchmarks/ (its modules importable as the scripts import them), offline."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO / "benchmarks", capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
