"""Run a test file's Triton checks in a child process (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_child(script: str, flag: str, device: str) -> dict:
    """`python script flag device` with the interpreter on for device "cpu"; returns the JSON of its last line."""
    drop = ("ELASTICMOE_MOE_BACKEND", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, script, flag, device], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
