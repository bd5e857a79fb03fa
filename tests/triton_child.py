"""Run a test file's Triton checks in a child process (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def child_tests(script: str, flag: str, names: list[str]) -> tuple:
    """A test file's module-scoped child runs (fixtures child_interpreted and child_cuda) and its two tests over
    them, a case per name of the child's JSON: under the interpreter, and on CUDA (skipped without a GPU). The
    file binds all four at module level, where pytest finds them."""

    @pytest.fixture(scope="module", name="child_interpreted")
    def interpreted_results():
        return run_child(script, flag, "cpu")

    @pytest.fixture(scope="module", name="child_cuda")
    def cuda_results():
        return run_child(script, flag, "cuda")

    @pytest.mark.parametrize("name", names)
    def interpreted(child_interpreted, name):
        assert child_interpreted[name]["ok"], child_interpreted[name]

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
    @pytest.mark.parametrize("name", names)
    def on_cuda(child_cuda, name):
        assert child_cuda[name]["ok"], child_cuda[name]

    return interpreted_results, cuda_results, interpreted, on_cuda
