"""Frames over the shard's Unix socket against loopback TCP, each next to its own floor, one run: 16 KiB .. 8 MiB of
bf16 hidden states per shard, fanned out to 1, 2 and 4 echo shards (each its own process): a raw socket echo over TCP
("socket") and over a Unix socket ("socket-unix"), the socket transport over TCP ("frames-tcp", a shard on another
host) and over the frame listener's Unix socket ("frames-unix", a shard on the gateway's host, as deployed).
One caller thread; modes rotate call by call; glibc malloc tuned everywhere. Writes
benchmarks/results/transport-unix-<cpu>.json."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import grpc
import torch

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc.codec import tune_malloc
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
import rpc_fanout  # benchmarks/rpc_fanout.py
import socket_echo  # benchmarks/socket_echo.py
from transport import (SHARDS, SIZES, SocketFanout, _fanout, _names, _request, _start, _target, matrix, report,
                       round_trips)

MODES = ("socket", "socket-unix", "frames-tcp", "frames-unix")
FLOOR = {"frames-tcp": "socket", "frames-unix": "socket-unix"}  # each transport mode against the floor of its medium


def _case(targets: dict[str, list[str]], tokens: int, calls: int, transports: dict) -> dict:
    req, payload = _request(tokens)
    floors = {m: SocketFanout(targets[m]) for m in ("socket", "socket-unix")}
    try:
        callers = {m: (lambda f=f: f.call(payload)) for m, f in floors.items()}
        callers.update({m: _fanout(transports[m], targets[m], req) for m in FLOOR})
        r = round_trips(callers, calls)
    finally:
        for f in floors.values():
            f.close()
    n = len(targets["socket"])
    for m in MODES:  # bytes both ways to every shard per round trip, at the median
        r[m]["gb_s"] = 2 * n * len(payload) / (r[m]["p50_us"] * 1e3)
    for m, floor in FLOOR.items():
        r[f"{m}_vs_floor_p50"] = r[m]["p50_us"] / r[floor]["p50_us"]
        r[f"{m}_of_floor_gb_s"] = r[m]["gb_s"] / r[floor]["gb_s"]
    r["unix_vs_tcp_p50"] = r["frames-unix"]["p50_us"] / r["frames-tcp"]["p50_us"]
    r["frames-unix_vs_socket_p50"] = r["frames-unix"]["p50_us"] / r["socket"]["p50_us"]
    r.update(payload_bytes=len(payload), shards=n, calls=calls)
    return r


def run(scale: float, sizes: list[str], shards: tuple[int, ...]) -> dict:
    load_before = os.getloadavg()
    folder = tempfile.mkdtemp(prefix="em-echo-")
    echoes = [rpc_fanout.spawn([sys.executable, socket_echo.__file__, "--unix", f"{folder}/echo{i}.sock"])
              for i in range(max(shards))]
    frame_shards = [_start("grpc") for _ in range(max(shards))]
    lines = [p.stdout.readline().split() for p in echoes]
    targets = {"socket": [f"127.0.0.1:{int(port)}" for port, _ in lines], "socket-unix": [path for _, path in lines]}
    targets["frames-tcp"] = targets["frames-unix"] = [_target(p) for p in frame_shards]
    transports = {"frames-tcp": SocketTransport(insecure=True, unix=False),
                  "frames-unix": SocketTransport(insecure=True)}
    try:
        cases = matrix(_case, targets, transports, sizes, shards, scale)
        families = sorted(set(transports["frames-unix"].families.values()))
        assert families == ["AF_UNIX"] and set(transports["frames-tcp"].families.values()) == {"AF_INET"}, families
    finally:
        for t in transports.values():
            t.close()
        for p in echoes + frame_shards:
            p.stdin.close()
            p.wait(timeout=30)
        os.rmdir(folder)
    return {**stamp(), "grpc": grpc.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cases": cases,
            "note": "payload = bf16 hidden bytes per shard; each shard and each socket echo its own process on this "
                    "host; one caller thread; modes rotate; gb_s = 2 x shards x payload / p50 (both ways); "
                    "frames-* = SocketTransport (plaintext) to rpc_fanout's echo shards' frame listeners"}


def table(res: dict) -> str:
    lines = ["| payload x shards | " + " | ".join(f"{m} p50 / p99 ms, GB/s" for m in MODES)
             + " | frames-tcp / socket p50 | frames-unix / socket-unix p50 | frames-unix / frames-tcp p50"
             + " | frames-unix / socket p50 |", "|---" * (len(MODES) + 5) + "|"]
    for name, r in res["cases"].items():
        cells = [f"{r[m]['p50_us'] / 1e3:.2f} / {r[m]['p99_us'] / 1e3:.2f}, {r[m]['gb_s']:.2f}" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['frames-tcp_vs_floor_p50']:.2f}x"
                     f" | {r['frames-unix_vs_floor_p50']:.2f}x | {r['unix_vs_tcp_p50']:.2f}x"
                     f" | {r['frames-unix_vs_socket_p50']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", type=float, default=1.0, help="x the calls timed per case")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--shards", default=",".join(map(str, SHARDS)))
    p.add_argument("--json", help="default: benchmarks/results/transport-unix-<cpu>.json")
    a = p.parse_args(argv)
    sizes = _names(p, "--sizes", a.sizes, SIZES)
    torch.set_num_threads(1)
    tune_malloc()
    res = run(a.scale, sizes, tuple(int(n) for n in a.shards.split(",")))
    report(res, table(res), a.json, "transport-unix", vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
