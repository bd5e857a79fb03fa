"""`benchmarks/serving.py --no-serve` (the GPU lease's serving run) works with neither Ray nor pydantic installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.moe_cases import REPO

BLOCKER = '''import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "pydantic"):
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, _Block())
'''


def test_serving_no_serve_runs_without_ray_or_pydantic(tmp_path):
    """As on the leased GPU image (no Ray; a Ray wheel is over what one call can carry): LLM.generate,
    transformers and the direct design (gateway engine here, 2 shard processes over mTLS) at 2 concurrencies."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "serving.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    args = ["--layers", "2", "--hidden", "64", "--intermediate", "64", "--tokens", "4", "--concurrency", "1,2"]
    proc = subprocess.run([sys.executable, "serving.py", "--no-serve", *args, "--out", str(out)],
                          cwd=REPO / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    systems = {(r["system"].split(" ")[0].rstrip(":"), r["concurrency"]) for r in report["rows"]}
    assert systems == {(s, c) for s in ("LLM.generate", "transformers", "direct") for c in (1, 2)}, systems
    assert all(r["tok_s"] > 0 for r in report["rows"]) and report["fanout"] is None and report["gpu"] is None
    direct = [r for r in report["rows"] if r["system"].startswith("direct")]
    assert all(r["fanout_samples"] > 0 and 0 <= r["fanout_p50_ms"] <= r["fanout_p99_ms"] for r in direct), direct
    assert "direct / LLM.generate" in proc.stdout and "served" not in proc.stdout
    blocked = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert "not installed here: ray" in blocked.stderr  # the blocker was in force
