"""Overload: offer 10x the gateway's capacity for 30 s and check that accepted requests keep their speed.

Starts its own local Ray on 127.0.0.1 and serves a tiny Mixtral (2 shards, 8 sequences + 8 waiting per
gateway), then, through each ingress in turn (Serve's gRPC proxy, the gateway's direct_grpc port):
(1) Unloaded: 8 closed-loop greedy gRPC streams for 20 s give the capacity (requests/s) and the
TPOT of a full batch. (2) Overload: open-loop Poisson arrivals at 10x that rate for 30 s. Reports accepted
requests' TPOT p99 against the unloaded run, rejection latency p99 (RESOURCE_EXHAUSTED), the gateway's memory
growth, every status code seen (with its first message), and crashes (gateway restarts, INTERNAL). Prints a table,
writes benchmarks/results/overload.json. Targets: TPOT p99 <= 1.5x unloaded, rejections p99 <= 50 ms, memory
growth <= 10 %, 0 crashes, no status but OK and RESOURCE_EXHAUSTED.
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
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "overload.json"
APP, DIRECT_PORT = "ovl", 9101
INGRESS = {"proxy": "127.0.0.1:9000", "port": f"127.0.0.1:{DIRECT_PORT}"}  # Serve's gRPC proxy, the direct_grpc port
MAX_SEQS, MAX_QUEUE, TOKENS = 8, 8, 32
UNLOADED_S, OVERLOAD_S, FACTOR = 20.0, 30.0, 10.0


class Run:
    """Every request's outcome: TPOT of accepted ones, latency of rejections, status codes."""

    def __init__(self):
        self.tpot: list[float] = []
        self.rejected_s: list[float] = []
        self.codes: dict[str, int] = {}
        self.details: dict[str, str] = {}  # each status code's first message (where a code comes from)
        self.done = 0
        self.seconds = 0.0  # closed loop: from the first request to the last one's end

    def count(self, code: str, details: str = "") -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.details.setdefault(code, details[:300])


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
        run.count(code, e.details() or "")
        if code == "RESOURCE_EXHAUSTED" and first is None:
            run.rejected_s.append(time.perf_counter() - t0)
        return
    run.count("OK")
    run.done += 1
    if n > 1:
        run.tpot.append((last - first) / (n - 1))


async def closed_loop(target: str, seconds: float, clients: int) -> Run:
    import grpc

    from elasticmoe.rpc import generation_pb2_grpc as gen_grpc

    run = Run()
    async with grpc.aio.insecure_channel(target) as ch:
        stub = gen_grpc.GenerationStub(ch)
        t0 = time.perf_counter()
        end = t0 + seconds

        async def client(c: int) -> None:
            i = 0
            while time.perf_counter() < end:
                await one(stub, run, c * 100_000 + i)
                i += 1

        await asyncio.gather(*(client(c) for c in range(clients)))
        run.seconds = time.perf_counter() - t0  # past `seconds`: the requests begun before it ran to their end
    return run


async def open_loop(target: str, seconds: float, rate: float) -> Run:
    """Poisson arrivals at `rate` per second, each its own task; waits for all of them to end."""
    import grpc

    from elasticmoe.rpc import generation_pb2_grpc as gen_grpc

    run, rng = Run(), random.Random(0)
    async with grpc.aio.insecure_channel(target) as ch:
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


def measure(gw, target: str) -> dict:
    """Through one ingress: capacity (closed loop), then 10x that offered open loop, then serving afterwards."""
    asyncio.run(closed_loop(target, 5.0, 2))  # warm-up
    mem = Memory(gw)
    rss0, pid0 = mem.read()
    base = asyncio.run(closed_loop(target, UNLOADED_S, MAX_SEQS))
    capacity = base.done / base.seconds  # every request done, over the time they took (not UNLOADED_S)
    mem.thread.start()
    over = asyncio.run(open_loop(target, OVERLOAD_S, FACTOR * capacity))
    time.sleep(3.0)
    mem.stop.set()
    mem.thread.join(timeout=60)
    rss1, pid1 = mem.read()
    after = asyncio.run(closed_loop(target, 5.0, 2))  # still serving afterwards
    peak = max([s for s in mem.samples if s] + [rss1 or 0])
    growth = (peak - rss0) / rss0 if rss0 else None
    crashes = int(pid1 != pid0) + int("unreachable" in mem.pids) + over.codes.get("INTERNAL", 0)
    tpot0, tpot1 = pct(base.tpot, 99), pct(over.tpot, 99)
    r = {"capacity_rps": capacity, "offered_rps": FACTOR * capacity,
         "unloaded": {"tpot_p50_s": pct(base.tpot, 50), "tpot_p99_s": tpot0, "codes": base.codes},
         "overload": {"seconds": OVERLOAD_S, "accepted": len(over.tpot), "codes": over.codes,
                      "details": {c: d for c, d in over.details.items() if c != "OK"},
                      "tpot_p50_s": pct(over.tpot, 50), "tpot_p99_s": tpot1,
                      "rejection_p50_s": pct(over.rejected_s, 50), "rejection_p99_s": pct(over.rejected_s, 99)},
         "tpot_p99_ratio": (tpot1 / tpot0) if tpot0 and tpot1 else None,
         "gateway_rss_bytes": {"before": rss0, "peak": peak, "after": rss1}, "gateway_memory_growth": growth,
         "crashes": crashes, "served_after": after.codes}
    r["targets_met"] = {
        "tpot_p99_within_1.5x": r["tpot_p99_ratio"] is not None and r["tpot_p99_ratio"] <= 1.5,
        "rejection_p99_le_50ms": r["overload"]["rejection_p99_s"] is not None
        and r["overload"]["rejection_p99_s"] <= 0.05,
        "memory_growth_le_10pct": growth is not None and growth <= 0.10, "no_crashes": crashes == 0,
        "only_ok_or_resource_exhausted": set(over.codes) <= {"OK", "RESOURCE_EXHAUSTED"}}
    return r


def report(results: dict[str, dict]) -> None:
    """One column per ingress and load."""
    cols = [(ing, load) for ing in results for load in ("unloaded", "10x overload")]
    print("\n" + f"{'':<26}" + "".join(f"{ing + ' ' + load:>22}" for ing, load in cols))

    def row(name: str, cell) -> None:
        print(f"{name:<26}" + "".join(f"{cell(results[ing], load == 'unloaded'):>22}" for ing, load in cols))
    row("requests/s offered", lambda r, u: f"{r['capacity_rps'] if u else r['offered_rps']:.1f}")
    row("TPOT p50 / p99 ms", lambda r, u: " / ".join(ms(r["unloaded" if u else "overload"][f"tpot_p{q}_s"])
                                                     for q in (50, 99)))
    row("rejection p50 / p99 ms", lambda r, u: "-" if u else " / ".join(
        ms(r["overload"][f"rejection_p{q}_s"]) for q in (50, 99)))
    row("gateway memory growth", lambda r, u: "-" if u else f"{(r['gateway_memory_growth'] or 0) * 100:.1f}%")
    row("crashes", lambda r, u: "-" if u else str(r["crashes"]))
    for ing, r in results.items():
        print(f"{ing}: codes under overload {r['overload']['codes']}, afterwards {r['served_after']}; "
              f"targets {r['targets_met']}")
        for code, details in r["overload"]["details"].items():
            print(f"  {code}: {details}")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ingress", default="proxy,port", help="through Serve's gRPC proxy (proxy), the gateway's "
                    "direct_grpc port (port), or both, one after the other")
    ingresses = ap.parse_args().ingress.split(",")
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
    cfg.write_text(yaml.safe_dump(lc.serve_config([lc.app_entry(APP, model, 2, limits=limits,
                                                                direct_grpc={"port": DIRECT_PORT})])))
    lc.stop_ray()
    lc.start_ray(num_cpus=8)
    try:
        lc.serve_deploy(cfg)
        lc.wait_running(APP)
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        gw = serve.get_deployment_handle("Gateway", app_name=APP)
        results = {ing: measure(gw, INGRESS[ing]) for ing in ingresses}
    finally:
        lc.stop_ray()
    out = {**stamp(), "model": "tiny mixtral, 2 layers x 8 experts, 2 shards",
           "limits": limits, "tokens_per_request": TOKENS,
           "settings": {"ingresses": ingresses, "unloaded_s": UNLOADED_S, "overload_s": OVERLOAD_S,
                        "offered_x_capacity": FACTOR}, "ingresses": results}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    report(results)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
