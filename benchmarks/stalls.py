"""Failed streams and the longest gap between streamed tokens around every single fault the cluster survives.

Starts its own local Ray on 127.0.0.1 and serves three apps of a tiny Mixtral (2 shards each): `stall` (skewed
routers, rebalancing every 2 s), `rep` (every expert on both shards) and `one` (one copy of each expert). Keeps 4
greedy streams busy on the app under test and injects, one after another: a live rebalance, a shard SIGKILL
(replicated and not), a controller SIGKILL, a shard SIGSTOP of 8 s (replicated and not) and a gateway SIGKILL.
Prints a table and writes benchmarks/results/stalls.json (the README table).
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

from elasticmoe import local_cluster as lc
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "stalls.json"
STREAMS, MAX_TOKENS, WINDOW_S = 4, 48, 20.0  # greedy streams per app, tokens each, seconds watched


class Streams:
    """Client threads streaming greedy requests to one app; every token's arrival time and every failure. A gap is
    between two tokens of one stream, or from a failed stream's last token to its retry's first."""

    def __init__(self, app: str, n: int = STREAMS, target: str = "127.0.0.1:9000"):
        self.app, self.target, self.stop, self.arrivals, self.failures = app, target, threading.Event(), [], []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        from elasticmoe.client import GenerationClient

        client = GenerationClient(self.target, app=self.app)
        last = None  # the client's last token: kept across a failed stream, so its retry's first token's gap
        while not self.stop.is_set():  # covers the failure, the retry and the restart it waited for
            try:
                for _ in client.stream(f"stream {i} asks the experts", max_tokens=MAX_TOKENS, temperature=0.0,
                                       ignore_eos=True):
                    now = time.time()
                    with self.lock:
                        if last is not None:
                            self.arrivals.append((now, now - last))
                    last = now
                last = None  # ended well: the next request's first token is no gap in a stream
            except Exception as e:  # noqa: BLE001 - counted
                with self.lock:
                    self.failures.append((time.time(), getattr(e, "code", lambda: type(e).__name__)()))
                time.sleep(0.2)

    def gaps(self, t0: float, t1: float) -> list[float]:
        with self.lock:
            return [g for t, g in self.arrivals if t0 <= t <= t1]

    def failed(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(1 for t, _ in self.failures if t0 <= t <= t1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def handles(app: str):
    from ray import serve

    return {d: serve.get_deployment_handle(d, app_name=app) for d in ("Gateway", "Controller", "ExpertShard")}


def settled(app: str, timeout: float = 240) -> dict:
    ctl = handles(app)["Controller"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            s = ctl.status.remote().result(timeout_s=30)
            if s["complete"] and not s.get("recovering") and s["num_shards"] == 2 and sum(
                    1 for x in s["shards"] if x["ready"] and x["healthy"]) == 2 and min(
                    min(row) for row in s["copies"]) >= (2 if app == "rep" else 1):
                return s
        except Exception:  # noqa: BLE001 - a restarting controller
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{app} did not settle")


def shard_pids(app: str) -> list[int]:
    return sorted(lc.shard_pids(app).values())


def fault(name: str, app: str, inject, window_s: float = WINDOW_S) -> dict:
    """Stream on `app`, then inject(started: when the streams began); failures and gaps in [t - 1, t + window_s],
    t the time inject was called, or the time of the fault it waited for (a placement event) where it returns one."""
    settled(app)
    started = time.time()
    streams = Streams(app)
    time.sleep(3.0)
    before = streams.gaps(0, now := time.time())
    t = inject(started) or now
    time.sleep(max(0.0, t + window_s - time.time()))
    streams.close()
    gaps = streams.gaps(t - 1, t + window_s)
    row = {"event": name, "app": app, "failed_streams": streams.failed(t - 1, t + window_s),
           "longest_gap_ms": max(gaps, default=0.0) * 1e3, "median_gap_ms": float(np.median(before)) * 1e3,
           "tokens_in_window": len(gaps)}
    print(f"{name:<34}{row['failed_streams']:>8}{row['median_gap_ms']:>14.1f}{row['longest_gap_ms']:>16.1f}",
          flush=True)
    return row


def pause(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(seconds, os.kill, (pid, signal.SIGCONT)).start()


def placement_time(events: list[dict], since: float) -> float | None:
    """The time of the first placement event (the controller's event log) at or after `since`, else None."""
    return next((e["t"] for e in events if e["event"] == "placement" and e["t"] >= since), None)


def wait_rebalance(started: float) -> float:
    """The time of the stall app's first rebalance since the streams `started` (their load is what it moves on;
    the controller's clock is this machine's): it may come before this call, while the streams warm up."""
    ctl = handles("stall")["Controller"]
    deadline = time.time() + 120
    while time.time() < deadline:
        if (t := placement_time(ctl.status.remote().result()["events"], started)) is not None:
            return t
        time.sleep(0.2)
    raise TimeoutError("stall: no rebalance within 120 s of its streams")


def main() -> None:
    lc.use_local_ray_env("127.0.0.1")  # its own loopback cluster; before Ray's import, which reads the settings
    import ray

    from elasticmoe.model.skewed import make_skewed_model
    from elasticmoe.model.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    skew, plain = make_skewed_model(tmp / "skew"), make_tiny_model("mixtral", tmp / "plain", layers=2, experts=8)
    auto = {"min_shards": 2, "max_shards": 2, "rebalance_interval_s": 2.0, "slots_per_shard": 6,
            "target_utilization": 1.0}
    apps = [lc.app_entry("stall", skew, 2, autoscaling=auto), lc.app_entry("rep", plain, 2, expert_copies=2),
            lc.app_entry("one", plain, 2)]
    cfg = tmp / "stalls.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(lc.serve_config(apps)))
    lc.stop_ray()
    lc.start_ray(num_cpus=8)
    rows = []
    try:
        lc.serve_deploy(cfg)
        for a in apps:
            lc.wait_running(a["name"])
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        print(f"\n{'event':<34}{'failed':>8}{'median gap ms':>14}{'longest gap ms':>16}")
        rows.append(fault("live rebalance", "stall", wait_rebalance, 5.0))
        rows.append(fault("shard kill (replicated)", "rep", lambda _: os.kill(shard_pids("rep")[0], signal.SIGKILL)))
        rows.append(fault("shard kill (single copies)", "one",
                          lambda _: os.kill(lc.sole_holder("one"), signal.SIGKILL)))
        ctl_pid = handles("rep")["Controller"].info.remote().result()["pid"]
        rows.append(fault("controller kill", "rep", lambda _: os.kill(ctl_pid, signal.SIGKILL)))
        rows.append(fault("shard pause 8 s (replicated)", "rep", lambda _: pause(shard_pids("rep")[0], 8.0)))
        rows.append(fault("shard pause 8 s (single copies)", "one", lambda _: pause(lc.sole_holder("one"), 8.0)))
        gw_pid = handles("one")["Gateway"].stats.remote().result()["pid"]
        rows.append(fault("gateway kill", "one", lambda _: os.kill(gw_pid, signal.SIGKILL), 40.0))
    finally:
        lc.stop_ray()
    result = {**stamp(), "settings": {"apps": apps, "streams_per_app": STREAMS, "max_tokens": MAX_TOKENS,
                                      "window_s": WINDOW_S, "gateway_kill_window_s": 40.0}, "rows": rows,
              "note": "gateway kill: the streams on the killed gateway break with UNAVAILABLE (its KV cache is "
                      "gone); GenerationClient.stream resumes them on the replacement; the longest gap includes its "
                      "restart"}
    OUT.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
