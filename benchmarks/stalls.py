"""Longest engine-step stall and longest gap between streamed tokens during a live rebalance and a shard kill.

Starts its own local Ray on 127.0.0.1, serves a tiny Mixtral whose routers favour two experts (2 shards,
rebalancing every 2 s), keeps 8 streams busy, and reads the gateway's step log around (1) the first
placement change with moves and (2) a SIGKILL of one shard process. Prints a table, writes
benchmarks/results/stalls.json (merged into the README table with balance.py's figures).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "benchmarks" / "results" / "stalls.json"


class Streams:
    """8 client threads streaming greedy requests; records every token's arrival time."""

    def __init__(self, app: str, n: int = 8):
        self.app, self.stop, self.arrivals, self.failed = app, threading.Event(), [], 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        from elasticmoe.client import GenerationClient

        client = GenerationClient("127.0.0.1:9000", app=self.app)
        while not self.stop.is_set():
            last = None
            try:
                for msg in client.stream(f"stream {i} asks the experts", max_tokens=48, temperature=0.0,
                                         ignore_eos=True):
                    now = time.time()
                    with self.lock:
                        if last is not None:
                            self.arrivals.append((now, now - last))
                    last = now
            except Exception:  # noqa: BLE001 - counted
                self.failed += 1

    def max_gap(self, t0: float, t1: float) -> float:
        with self.lock:
            gaps = [g for t, g in self.arrivals if t0 <= t <= t1]
        return max(gaps, default=0.0)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def window(steps: list[tuple[float, float]], t0: float, t1: float) -> float:
    return max((s for t, s in steps if t0 <= t <= t1), default=0.0)


def main() -> None:
    import yaml
    from ray import serve

    from elasticmoe import local_cluster as lc
    from tests.serving_util import make_skewed_model, serve_config

    model = make_skewed_model(Path(tempfile.mkdtemp()) / "skew")
    app = {"name": "stall", "route_prefix": "/stall", "import_path": "elasticmoe.app:build_app",
           "args": {"model": str(model), "num_shards": 2, "gateway_resources": {"num_cpus": 0.5},
                    "shard_resources": {"num_cpus": 0.5},
                    "autoscaling": {"min_shards": 2, "max_shards": 2, "rebalance_interval_s": 2.0,
                                    "slots_per_shard": 6, "target_utilization": 1.0}}}
    cfg = Path(tempfile.mkdtemp()) / "stall.yaml"
    cfg.write_text(yaml.safe_dump(serve_config([app])))
    lc.stop_ray()
    lc.start_ray(num_cpus=8)
    try:
        lc.serve_deploy(cfg)
        lc.wait_running("stall")
        result = measure(serve, Streams("stall"))
    finally:
        lc.stop_ray()
    print(f"\n{'event':<22}{'median step ms':>16}{'longest step ms':>17}{'longest token gap ms':>22}")
    for name, r in result["events"].items():
        print(f"{name:<22}{r['median_step_ms']:>16.1f}{r['longest_step_ms']:>17.1f}{r['longest_gap_ms']:>22.1f}")
    print(f"failed streams: {result['failed_streams']}")
    OUT.write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT}")


def measure(serve, streams: Streams) -> dict:
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    gw = serve.get_deployment_handle("Gateway", app_name="stall")
    ctl = serve.get_deployment_handle("Controller", app_name="stall")
    shards = serve.get_deployment_handle("ExpertShard", app_name="stall")
    t_start = time.time()
    events: dict[str, dict] = {}
    deadline = time.time() + 120
    rebalance_at = None
    while time.time() < deadline and rebalance_at is None:
        time.sleep(1.0)
        moves = [e for e in ctl.status.remote().result()["events"] if e["event"] == "placement" and e["moves"] > 0]
        rebalance_at = moves[0]["t"] if moves else None
    steps = gw.step_times.remote(t_start).result()
    median = float(np.median([s for _, s in steps])) * 1e3 if steps else 0.0
    if rebalance_at is not None:
        events["live rebalance"] = {"median_step_ms": median, "longest_step_ms": window(steps, rebalance_at - 3,
                                    rebalance_at + 3) * 1e3, "longest_gap_ms": streams.max_gap(rebalance_at - 3,
                                    rebalance_at + 3) * 1e3}
    pids = {shards.info.remote().result()["pid"] for _ in range(30)}
    t_kill = time.time()
    os.kill(min(pids), signal.SIGKILL)
    time.sleep(20)
    steps = gw.step_times.remote(t_start).result()
    events["shard killed"] = {"median_step_ms": median, "longest_step_ms": window(steps, t_kill, t_kill + 20) * 1e3,
                              "longest_gap_ms": streams.max_gap(t_kill, t_kill + 20) * 1e3}
    streams.close()
    return {"events": events, "failed_streams": streams.failed, "steps": len(steps)}


if __name__ == "__main__":
    main()
