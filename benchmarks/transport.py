"""The cost of mTLS on the internal plane: RunExperts round trips to an echo shard (its own process, as shards are)
over plaintext and over mTLS (rpc.tls, the local CA), from a blocking stub in one thread as the gateway's fan-out
calls it, at 16 KiB and 1 MiB of hidden states. Calls alternate between the two channels, so machine noise hits
both alike. Also the time to a first answer on a fresh connection (TCP + TLS handshake). Writes
benchmarks/results/transport.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.bench import EchoShard, make_request, percentiles
from elasticmoe.rpc.codec import channel_options, server_options

OUT = Path(__file__).parent / "results" / "transport.json"
SIZES = {"16 KiB": 2, "1 MiB": 128}  # bf16 hidden [tokens, 4096]: 8 KiB per token


async def _serve(secure: bool) -> None:
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_ExpertShardServicer_to_server(EchoShard(), server)
    port = tls.add_port(server, "127.0.0.1:0", insecure=not secure)
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    await server.stop(None)


def _spawn(secure: bool) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--serve", *(["--secure"] if secure else [])]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return proc, f"127.0.0.1:{int(proc.stdout.readline())}"


def _channel(target: str, secure: bool) -> grpc.Channel:
    return tls.channel(target, channel_options(), insecure=not secure)


def round_trips(targets: dict[str, str], req: pb.RunExpertsRequest, calls: int, warmup: int = 50) -> dict:
    """Alternating calls on one long-lived channel per mode: latency percentiles per mode."""
    stubs = {m: pb_grpc.ExpertShardStub(_channel(t, m == "mtls")) for m, t in targets.items()}
    samples: dict[str, list[int]] = {m: [] for m in stubs}
    for i in range(warmup + calls):
        for m, stub in (stubs.items() if i % 2 else reversed(stubs.items())):
            t0 = time.perf_counter_ns()
            stub.RunExperts(req, timeout=30)
            if i >= warmup:
                samples[m].append(time.perf_counter_ns() - t0)
    return {m: percentiles(s) for m, s in samples.items()}


def first_calls(targets: dict[str, str], n: int) -> dict:
    """A fresh channel per call: connection set-up (and the TLS handshake) plus one Health round trip."""
    samples: dict[str, list[int]] = {m: [] for m in targets}
    for _ in range(n):
        for m, t in targets.items():
            t0 = time.perf_counter_ns()
            with _channel(t, m == "mtls") as ch:
                pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=30)
            samples[m].append(time.perf_counter_ns() - t0)
    return {m: percentiles(s) for m, s in samples.items()}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(calls: int, connects: int) -> dict:
    procs, targets = [], {}
    for mode in ("plaintext", "mtls"):
        proc, target = _spawn(mode == "mtls")
        procs.append(proc)
        targets[mode] = target
    try:
        sizes = {}
        for name, tokens in SIZES.items():
            req = make_request(tokens)
            r = round_trips(targets, req, calls)
            r["payload_bytes"] = len(req.hidden.data)
            r["ratio_p50"] = r["mtls"]["p50_us"] / r["plaintext"]["p50_us"]
            r["ratio_mean"] = r["mtls"]["mean_us"] / r["plaintext"]["mean_us"]
            sizes[name] = r
        conn = first_calls(targets, connects)
        conn["ratio_p50"] = conn["mtls"]["p50_us"] / conn["plaintext"]["p50_us"]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "grpc": grpc.__version__, "calls": calls,
            "round_trip": sizes, "new_connection": conn,
            "note": "echo shard in its own process on 127.0.0.1; blocking stub in one thread; calls alternate"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve", action="store_true", help="(internal) run one echo shard, print its port")
    p.add_argument("--secure", action="store_true", help="(internal) the echo shard requires mTLS")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--connects", type=int, default=50)
    p.add_argument("--json", default=str(OUT))
    a = p.parse_args(argv)
    if a.serve:
        asyncio.run(_serve(a.secure))
        return 0
    res = run(a.calls, a.connects)
    print(f"{res['cpu']} ({res['cpus']} CPUs), grpc {res['grpc']}")
    print(f"{'payload':>10} {'plaintext p50':>14} {'mTLS p50':>10} {'p50 ratio':>10} {'mean ratio':>11}")
    for name, r in res["round_trip"].items():
        print(f"{name:>10} {r['plaintext']['p50_us']:>11.0f} us {r['mtls']['p50_us']:>7.0f} us "
              f"{r['ratio_p50']:>10.3f} {r['ratio_mean']:>11.3f}")
    c = res["new_connection"]
    print(f"{'connect':>10} {c['plaintext']['p50_us']:>11.0f} us {c['mtls']['p50_us']:>7.0f} us {c['ratio_p50']:>10.3f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
