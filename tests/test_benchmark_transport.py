"""transport.py and rpc_fanout.py (benchmarks/) run end to end over spawned echo shards: every mode answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.moe_cases import REPO

MODES = ("socket", "unary", "stream", "stream-default", "frames")


def test_transport_benchmark_smoke(tmp_path):
    """A few calls per mode at 16 KiB to 1 and 2 shards, then the mTLS cost: real echo processes over real sockets,
    gRPC and TLS. Checks that each mode timed its calls and that the ratios and targets were derived from them."""
    shards_json, mtls_json = tmp_path / "t.json", tmp_path / "tm.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "transport.py", "--scale", "0.03", "--sizes", "16 KiB", "--shards", "1,2",
                           "--json", str(shards_json), "--mtls-json", str(mtls_json)],
                          cwd=REPO / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(shards_json.read_text())
    assert set(report["cases"]) == {"16 KiB x 1", "16 KiB x 2"}, report["cases"].keys()
    for name, case in report["cases"].items():
        assert case["payload_bytes"] == 16384 and case["calls"] > 0, (name, case)
        for mode in MODES:
            assert 0 < case[mode]["p50_us"] <= case[mode]["p99_us"], (name, mode, case[mode])
        ratio = case["frames"]["p50_us"] / case["socket"]["p50_us"]
        assert abs(case["frames_vs_socket_p50"] - ratio) < 1e-9, (name, case)
        assert report["targets"][f"{name} frames"]["met"] == (ratio <= 2.0), report["targets"]
    mtls = json.loads(mtls_json.read_text())
    assert {"frames", "frames-mtls", "stream", "stream-mtls", "unary", "unary-mtls"} <= set(mtls["cases"]["16 KiB"])
    assert mtls["new_connection"], mtls


def test_rpc_fanout_microbenchmark_smoke(tmp_path):
    """`benchmarks/rpc_fanout.py` (the codec and the fan-out strategies, over spawned echo shards): each strategy
    timed its calls at 1 and 2 shards."""
    out = tmp_path / "rf.json"
    proc = subprocess.run([sys.executable, "rpc_fanout.py", "--calls", "5", "--servers", "1", "2", "--kib", "8",
                           "--json", str(out)], cwd=REPO / "benchmarks", env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"codec", "8 KiB x 1 shard(s)", "8 KiB x 2 shard(s)"}, report.keys()
    for name, rows in report.items():
        assert rows and all(0 < r["p50_us"] <= r["p99_us"] for r in rows.values()), (name, rows)
