"""Overload: offer 10x the gateway's capacity for 30 s and check that accepted requests keep their speed.

Starts its own local Ray on 127.0.0.1 and serves a tiny Mixtral (2 shards, 8 sequences + 8 waiting per
gateway). (1) Unloaded: 8 closed-loop greedy gRPC streams for 20 s give the capacity (requests/s) and the
TPOT of a full batch. (2) Overload: open-loop Poisson arrivals at 10x that rate for 30 s. Reports accepted
requests' TPOT p99 against the unloaded run, rejection latency p99 (RESOURCE_EXHAUSTED), the gateway's memory
growth, every status code seen, and crashes (gateway restarts, INTERNAL). Prints a table, writes
benchmarks/results/overload.json. Targets: TPOT p99 <= 1.5x unloaded, rejections p99 <= 50 ms, memory
growth <= 10 %, 0 crashes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "overload.json"
APP, GRPC = "ovl", "127.0.0.1:9000"
MAX_SEQS, MAX_QUEUE, TOKENS = 8, 8, 32
UNLOADED_S, OVERLOAD_S, FACTOR = 20.0, 30.0, 10.0


class Run:
    """Every request's outcome: TPOT of accepted ones, latency of rejections, status codes."""

    def __init__(self):
        self.tpot: list[float] = []
        self.rejected_s: list[float] = []
        self.codes: dict[str, int] = {}
        self.done = 0

    def count(self, code: str) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


async def one(stub, run: Run, i: int) -> None:
    """One greedy stream; its TPOT if it ran, its time to the error if it was refused."""
    import grpc

    from elasticmoe.client import make_request

    req = make_request(f"request {i} asks the experts", max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    try:
        async for msg in stub.GenerateStream(req, metadata=(("application", APP),), timeout=120):
            now = time.perf_counter()
            first = now if first is None else first
            last, n = now, n + len(msg.token_ids)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        run.count(code)
        if code == "RESOURCE_EXHAUSTED" and first is None:
            run.rejected_s.append(time.perf_counter() - t0)
        return
    run.count("OK")
    run.done += 1
    if n > 1:
        run.tpot.append((last - first) / (n - 1))


async def closed_loop(seconds: float, clients: int) -> Run:
    import grpc

    from elasticmoe.rpc import generation_pb2_grpc as gen_grpc

    run = Run()
    async with grpc.aio.insecure_channel(GRPC) as ch:
        stub = gen_grpc.GenerationStub(ch)
        end = time.perf_counter() + seconds

        async def client(c: int) -> None:
            i = 0
            while time.perf_counter() < end:
                await one(stub, run, c * 100_000 + i)
                i += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
    return run


async def open_loop(seconds: float, rate: float) -> Run:
    """Poisson arrivals at `rate` per second, each its own task; waits for all of them to end."""
    import grpc

    from elasticmoe.rpc import generation_pb2_grpc as gen_grpc

    run, rng = Run(), random.Random(0)
    async with grpc.aio.insecure_channel(GRPC) as ch:
        stub = gen_grpc.GenerationStub(ch)
        tasks, t_next, end, i = [], time.perf_counter(), time.perf_counter() + seconds, 0
        while t_next < end:
            await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(stub, run, i)))
            i += 1
            t_next += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return run


class Memory:
    """Samples the gateway's RSS (and pid, to see restarts) once a second in the background."""

    def __init__(self, gateway):
        self.gw, self.samples, self.pids, self.stop = gateway, [], set(), threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> tuple[int | None, int | None]:
        st = self.gw.stats.remote().result(timeout_s=30)
        return st.get("rss_bytes"), st.get("pid")

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                rss, pid = self.read()
                self.samples.append(rss)
                self.pids.add(pid)
            except Exception:  # noqa: BLE001 - a restarting gateway shows up as a new pid
                self.pids.add("unreachable")
            self.stop.wait(1.0)


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def main() -> None:
    from elasticmoe import local_cluster as lc

    lc.use_local_ray_env("127.0.0.1")  # its own loopback cluster; before Ray's import, which reads the settings
    import ray
    import yaml
    from ray import serve

    from elasticmoe.model.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    model = make_tiny_model("mixtral", tmp / "mixtral", layers=2, experts=8)
    limits = {"max_num_seqs": MAX_SEQS, "max_queue": MAX_QUEUE, "max_model_len": 256, "max_queued_requests": 64}
    cfg = tmp / "overload.yaml"
    cfg.write_text(yaml.safe_dump(lc.serve_config([lc.app_entry(APP, model, 2, limits=limits)])))
    lc.stop_ray()
    lc.start_ray(num_cpus=8)
    try:
        lc.serve_deploy(cfg)
        lc.wait_running(APP)
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        gw = serve.get_deployment_handle("Gateway", app_name=APP)
        asyncio.run(closed_loop(5.0, 2))  # warm-up
        mem = Memory(gw)
        rss0, pid0 = mem.read()
        base = asyncio.run(closed_loop(UNLOADED_S, MAX_SEQS))
        capacity = base.done / UNLOADED_S
        mem.thread.start()
        over = asyncio.run(open_loop(OVERLOAD_S, FACTOR * capacity))
        time.sleep(3.0)
        mem.stop.set()
        mem.thread.join(timeout=60)
        rss1, pid1 = mem.read()
        after = asyncio.run(closed_loop(5.0, 2))  # still serving afterwards
    finally:
        lc.stop_ray()
    peak = max([s for s in mem.samples if s] + [rss1 or 0])
    growth = (peak - rss0) / rss0 if rss0 else None
    crashes = int(pid1 != pid0) + int("unreachable" in mem.pids) + over.codes.get("INTERNAL", 0)
    tpot0, tpot1 = pct(base.tpot, 99), pct(over.tpot, 99)
    result = {
        "cpu": cpu_model(), "model": "tiny mixtral, 2 layers x 8 experts, 2 shards",
        "limits": limits, "tokens_per_request": TOKENS, "capacity_rps": capacity, "offered_rps": FACTOR * capacity,
        "unloaded": {"tpot_p50_s": pct(base.tpot, 50), "tpot_p99_s": tpot0, "codes": base.codes},
        "overload": {"seconds": OVERLOAD_S, "accepted": len(over.tpot), "codes": over.codes,
                     "tpot_p50_s": pct(over.tpot, 50), "tpot_p99_s": tpot1,
                     "rejection_p50_s": pct(over.rejected_s, 50), "rejection_p99_s": pct(over.rejected_s, 99)},
        "tpot_p99_ratio": (tpot1 / tpot0) if tpot0 and tpot1 else None,
        "gateway_rss_bytes": {"before": rss0, "peak": peak, "after": rss1}, "gateway_memory_growth": growth,
        "crashes": crashes, "served_after": after.codes,
    }
    result["targets_met"] = {
        "tpot_p99_within_1.5x": result["tpot_p99_ratio"] is not None and result["tpot_p99_ratio"] <= 1.5,
        "rejection_p99_le_50ms": result["overload"]["rejection_p99_s"] is not None
        and result["overload"]["rejection_p99_s"] <= 0.05,
        "memory_growth_le_10pct": growth is not None and growth <= 0.10, "no_crashes": crashes == 0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(f"\n{'':<28}{'unloaded':>12}{'10x overload':>14}")
    print(f"{'requests/s offered':<28}{capacity:>12.1f}{FACTOR * capacity:>14.1f}")
    print(f"{'TPOT p50 ms':<28}{ms(pct(base.tpot, 50)):>12}{ms(pct(over.tpot, 50)):>14}")
    print(f"{'TPOT p99 ms':<28}{ms(tpot0):>12}{ms(tpot1):>14}")
    print(f"{'rejection p99 ms':<28}{'-':>12}{ms(result['overload']['rejection_p99_s']):>14}")
    print(f"{'gateway memory growth':<28}{'-':>12}{(growth or 0) * 100:>13.1f}%")
    print(f"{'crashes':<28}{'-':>12}{crashes:>14}")
    print(f"codes under overload: {over.codes}; afterwards: {after.codes}")
    print(f"targets: {result['targets_met']}\nwrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
