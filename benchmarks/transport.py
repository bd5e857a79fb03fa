"""Gateway -> shard round trips against the wire's floor, one run: 16 KiB .. 8 MiB of bf16 hidden states per shard,
fanned out to 1, 2 and 4 shards (each its own process), over a raw TCP socket echo (the floor: the same bytes,
length-prefixed, no codec), the unary gRPC path (gateway.transport.UnaryTransport) and the raw-frame stream
(StreamTransport), both plaintext to an echo shard (rpc_fanout.EchoShard); also the stream with grpc's default HTTP/2
and TCP settings on both ends (codec.HTTP2_OPTIONS off: "stream-default"), and the socket transport ("frames":
SocketTransport, the same frames on one TCP connection to the echo shard's frame listener; the same over its Unix
socket, against a Unix socket echo: transport_unix.py). glibc malloc tuned everywhere, as deployed.
One caller thread as the gateway's fan-out; modes rotate call by call, so machine noise hits all alike.
Writes benchmarks/results/transport-<cpu>.json. Then the mTLS cost (--only mtls: that alone): unary, stream, frames,
plaintext and mTLS (rpc.tls, a CA made in a temp dir) to one echo shard serving both ports, calls rotating;
also a fresh connection's first answer (TCP + TLS handshake): transport_mtls.py. Writes
benchmarks/results/transport-mtls-<cpu>.json."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.rpc.codec import HTTP2_TUNING, channel_options, tune_malloc
from elasticmoe.rpc.frame_types import as_tensor
from elasticmoe.rpc.frames import ExpertRequest
from elasticmoe.rpc.unix_socket import tune
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
import rpc_fanout  # benchmarks/rpc_fanout.py
from rpc_fanout import percentiles
import socket_echo  # benchmarks/socket_echo.py
from socket_echo import HEADER as _HEADER, recv_into as _recv_into

RESULTS = Path(__file__).parent / "results"
H = 4096  # bf16 hidden [tokens, 4096]: 8 KiB per token
SIZES = {"16 KiB": (2, 300), "64 KiB": (8, 200), "256 KiB": (32, 120), "1 MiB": (128, 60), "8 MiB": (1024, 16)}
SHARDS = (1, 2, 4)
MODES = ("socket", "unary", "stream", "stream-default", "frames", "frames-thread")
# frames: the socket transport (SocketTransport), the caller reading its answers as the dispatcher does; frames-thread:
# the same transport waited for on its Futures alone, so the connection's thread reads them and hands them over
TARGET_MODES = ("stream", "frames")
# the mTLS comparison: 1 shard; calls per mode (~1.5 min on 2 busy vCPUs); the target for mTLS p50 / plaintext p50
MTLS_SIZES = {"16 KiB": (2, 1000), "64 KiB": (8, 800), "1 MiB": (128, 300), "8 MiB": (1024, 40)}
MTLS_TARGET = 1.10


class SocketFanout:
    """The floor: the payload to every shard's socket echo (length-prefixed), then every echo read back."""

    def __init__(self, targets: list[str]):
        self.conns = []
        for t in targets:  # host:port, or a Unix socket's path
            if t.startswith("/"):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                tune(conn)  # as the transport's (unix_socket)
                conn.connect(t)
            else:
                host, port = t.rsplit(":", 1)
                conn = socket.create_connection((host, int(port)))
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(conn)
        self.head, self.buf = bytearray(_HEADER.size), bytearray()

    def call(self, payload: memoryview) -> None:
        if len(self.buf) < len(payload):
            self.buf = bytearray(len(payload))
        for conn in self.conns:  # each echo reads its whole request before answering: no deadlock
            conn.sendall(_HEADER.pack(len(payload)))
            conn.sendall(payload)
        for conn in self.conns:
            _recv_into(conn, memoryview(self.head))
            _recv_into(conn, memoryview(self.buf)[:_HEADER.unpack(self.head)[0]])

    def close(self) -> None:
        for c in self.conns:
            c.close()


def _start(kind: str) -> subprocess.Popen:
    """kind: grpc (rpc_fanout's echo shard, unary + raw stream), grpc-default (HTTP/2 tuning off), socket
    (socket_echo.py: no torch, no grpc to import), or mtls (transport_mtls.serve_mtls)."""
    env = {"ELASTICMOE_GRPC_HTTP2_TUNING": "0"} if kind == "grpc-default" else {}
    if kind == "socket":
        cmd = [sys.executable, socket_echo.__file__]
    elif kind.startswith("grpc"):
        cmd = [sys.executable, str(Path(__file__).with_name("rpc_fanout.py")), "--serve", "--tune-malloc"]
    else:
        cmd = [sys.executable, __file__, f"--serve-{kind}"]
    return rpc_fanout.spawn(cmd, **env)


def _target(proc: subprocess.Popen) -> str:
    """A started echo's address, once it is up (mtls: "plain_address secure_address")."""
    return " ".join(f"127.0.0.1:{int(port)}" for port in proc.stdout.readline().split())


def _spawn(kind: str) -> tuple[subprocess.Popen, str]:
    proc = _start(kind)
    return proc, _target(proc)


def _fanout(transport, targets: list[str], req: ExpertRequest, wait_through: bool = True):
    """One call per shard through a gateway transport, waited for through it (as failover does: the socket
    transport reads the answers on this thread) or, with wait_through=False, in concurrent.futures.wait (the
    connection's thread reads them); then every answer's output decoded."""
    def call() -> None:
        futures = [transport.send(t, lambda: req, 60) for t in targets]
        if not wait_through:
            cf.wait(futures)
        else:  # as the dispatcher's step waits (failover.Step.wait); a cf.wait after it cost 5-21 us of the
            while undone := [f for f in futures if not f.done()]:  # caller's time at 16 KiB (2026-12-07, 2 runs)
                transport.wait(undone, 60)
        for f in futures:
            as_tensor(f.result().output)  # as the dispatcher reads an answer
    return call


def round_trips(callers: dict, calls: int, warmup: int = 5, samples: dict | None = None) -> dict:
    """Rotating calls over the modes: latency percentiles per mode (`samples`, when given: filled with the ns)."""
    samples = {} if samples is None else samples
    samples.update({m: [] for m in callers})
    order = list(callers.items())
    for i in range(warmup + calls):
        for m, call in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter_ns()
            call()
            if i >= warmup:
                samples[m].append(time.perf_counter_ns() - t0)
    return {m: percentiles(s) for m, s in samples.items()}


def _request(tokens: int) -> tuple[ExpertRequest, memoryview]:
    """A request with bf16 hidden [tokens, H] (top-8 of 64 experts), and its hidden bytes."""
    hidden = torch.randn(tokens, H).to(torch.bfloat16)  # [T, H]
    req = ExpertRequest(1, hidden, torch.randint(0, 64, (tokens, 8), dtype=torch.int32), torch.rand(tokens, 8), 1)
    return req, memoryview(hidden.view(torch.uint8).numpy()).cast("B")


def _case(targets: dict[str, list[str]], tokens: int, calls: int, transports: dict) -> dict:
    req, payload = _request(tokens)
    sock = SocketFanout(targets["socket"])
    try:
        callers = {"socket": lambda: sock.call(payload)}
        callers.update({m: _fanout(transports[m], targets[m], req, m != "frames-thread") for m in MODES[1:]})
        r = round_trips(callers, calls)
    finally:
        sock.close()
    n = len(targets["socket"])
    for m in MODES:  # bytes both ways to every shard per round trip, at the median
        r[m]["gb_s"] = 2 * n * len(payload) / (r[m]["p50_us"] * 1e3)
    r.update(payload_bytes=len(payload), shards=n, calls=calls)
    for m in MODES[1:]:  # x the socket floor's latency; fraction of its throughput
        r[f"{m}_vs_socket_p50"] = r[m]["p50_us"] / r["socket"]["p50_us"]
        r[f"{m}_of_socket_gb_s"] = r[m]["gb_s"] / r["socket"]["gb_s"]
    return r


def targets_met(cases: dict) -> dict:
    """Issue 14's targets, for the stream and the socket transport ("frames"): >= 1 MiB at >= 50% of the socket's
    GB/s; <= 64 KiB p50 within 2x."""
    out = {}
    for name, r in cases.items():
        for m in TARGET_MODES:
            if r["payload_bytes"] >= 1 << 20:
                out[f"{name} {m}"] = {"target": ">= 0.5 of socket GB/s", "value": r[f"{m}_of_socket_gb_s"],
                                      "met": r[f"{m}_of_socket_gb_s"] >= 0.5}
            elif r["payload_bytes"] <= 64 << 10:
                out[f"{name} {m}"] = {"target": "p50 <= 2x socket", "value": r[f"{m}_vs_socket_p50"],
                                      "met": r[f"{m}_vs_socket_p50"] <= 2.0}
    return out


def matrix(case, targets: dict[str, list[str]], transports: dict, sizes: list[str], shards: tuple[int, ...],
           scale: float) -> dict:
    """case(targets of the first n shards, tokens, calls, transports) for every size and shard count, by name."""
    cases = {}
    for name in sizes:
        tokens, calls = SIZES[name]
        for n in shards:
            cases[f"{name} x {n}"] = case({m: t[:n] for m, t in targets.items()}, tokens, max(8, int(calls * scale)),
                                          transports)
    return cases


def run(scale: float, sizes: list[str], shards: tuple[int, ...]) -> dict:
    load_before = os.getloadavg()  # others' work on the machine inflates every mode's times
    kinds = {"socket": "socket", "unary": "grpc", "stream-default": "grpc-default"}
    procs = {kind: [_start(kind) for _ in range(max(shards))] for kind in ("grpc", "grpc-default", "socket")}
    started = {kind: [(p, _target(p)) for p in ps] for kind, ps in procs.items()}  # started together, then waited
    targets = {m: [t for _, t in started[kinds.get(m, "grpc")]] for m in MODES}  # unary and stream: same shards
    transports = {"unary": UnaryTransport(insecure=True), "stream": StreamTransport(insecure=True),
                  "stream-default": StreamTransport(insecure=True, options=channel_options(http2=False)),
                  "frames": SocketTransport(insecure=True, unix=False),  # TCP, as the floor (Unix: transport_unix.py)
                  "frames-thread": SocketTransport(insecure=True, unix=False)}
    try:
        cases = matrix(_case, targets, transports, sizes, shards, scale)
    finally:
        for t in transports.values():
            t.close()
        for p, _ in (p for procs in started.values() for p in procs):
            p.stdin.close()
            p.wait(timeout=30)
    return {**stamp(), "grpc": grpc.__version__, "http2_tuning": HTTP2_TUNING,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cases": cases,
            "targets": targets_met(cases),
            "note": "payload = bf16 hidden bytes per shard; each shard and each socket echo its own process on "
                    "127.0.0.1; one caller thread; modes rotate; gb_s = 2 x shards x payload / p50 (both ways); "
                    "frames = SocketTransport to the echo shards' frame listeners (the unary/stream processes), "
                    "over TCP"}


def table(res: dict) -> str:
    """Markdown: p50 / p99 latency and GB/s per mode, payload and shard count, with ratios to the socket floor."""
    lines = ["| payload x shards | " + " | ".join(f"{m} p50 / p99 ms, GB/s" for m in MODES)
             + " | unary / socket p50 | stream / socket p50, GB/s | frames / socket p50, GB/s"
             + " | frames / frames-thread p50 |",
             "|---" * (len(MODES) + 5) + "|"]
    for name, r in res["cases"].items():
        cells = [f"{r[m]['p50_us'] / 1e3:.2f} / {r[m]['p99_us'] / 1e3:.2f}, {r[m]['gb_s']:.2f}" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['unary_vs_socket_p50']:.2f}x"
                     + "".join(f" | {r[m + '_vs_socket_p50']:.2f}x, {r[m + '_of_socket_gb_s']:.2f}"
                               for m in TARGET_MODES)
                     + f" | {r['frames']['p50_us'] / r['frames-thread']['p50_us']:.2f}x |")
    return "\n".join(lines)


def _write(res: dict, path: str | None, stem: str, args: dict) -> None:
    res = {**res, "args": args}
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", res["cpu"]).strip("-").lower()
    out = Path(path) if path else RESULTS / f"{stem}-{cpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


def report(res: dict, table_text: str, path: str | None, stem: str, args: dict) -> None:
    """Print a run's machine line and its table, then write its JSON (benchmarks/results/<stem>-<cpu>.json unless
    `path`): the sibling scripts' (transport_unix.py, transport_ladder.py) ending."""
    print(f"{res['cpu']} ({res['cpus']} CPUs), grpc {res['grpc']}, load average {res['loadavg_before'][0]:.2f} "
          f"before, {res['loadavg_after'][0]:.2f} after")
    print(table_text)
    _write(res, path, stem, args)


def _names(p: argparse.ArgumentParser, flag: str, value: str, known: dict) -> list[str]:
    """A comma-separated option's names, each one of `known`: an unknown one is refused before any echo starts."""
    names = value.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve-mtls", action="store_true", help="(internal) run one echo shard, plaintext + mTLS")
    p.add_argument("--only", choices=("shards", "mtls"), help="run only the shard/size matrix, or only the mTLS cost")
    p.add_argument("--scale", type=float, default=1.0, help="x the calls timed per case")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--shards", default=",".join(map(str, SHARDS)))
    p.add_argument("--mtls-sizes", default=",".join(MTLS_SIZES), help="comma-separated, of: " + ", ".join(MTLS_SIZES))
    p.add_argument("--json", help="default: benchmarks/results/transport-<cpu>.json")
    p.add_argument("--mtls-json", help="default: benchmarks/results/transport-mtls-<cpu>.json")
    a = p.parse_args(argv)
    sizes, mtls_sizes = _names(p, "--sizes", a.sizes, SIZES), _names(p, "--mtls-sizes", a.mtls_sizes, MTLS_SIZES)
    if a.serve_mtls:
        from transport_mtls import serve_mtls  # benchmarks/transport_mtls.py (it imports this module)

        tune_malloc()
        asyncio.run(serve_mtls())
        return 0
    torch.set_num_threads(1)
    tune_malloc()  # as the gateway and shard deployments do (and the echo shards, --tune-malloc)
    if a.only != "mtls":
        res = run(a.scale, sizes, tuple(int(n) for n in a.shards.split(",")))
        print(f"{res['cpu']} ({res['cpus']} CPUs), grpc {res['grpc']}, http2 tuning {res['http2_tuning']}, "
              f"load average {res['loadavg_before'][0]:.2f} before, {res['loadavg_after'][0]:.2f} after")
        print(table(res))
        for name, t in res["targets"].items():
            print(f"{name}: {t['target']}: {t['value']:.2f} {'met' if t['met'] else 'MISSED'}")
        _write(res, a.json, "transport", vars(a))
    if a.only != "shards":
        from transport_mtls import mtls_table, run_mtls  # benchmarks/transport_mtls.py (it imports this module)

        res = run_mtls(a.scale, mtls_sizes)
        print(f"mTLS: {res['cpu']} ({res['cpus']} CPUs), grpc {res['grpc']}, target p50 <= {MTLS_TARGET}x plaintext")
        print(mtls_table(res))
        print("target met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["target_met"].items()))
        _write(res, a.mtls_json, "transport-mtls", vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
