"""Gateway -> shard round trips against the wire's floor: RunExperts to an echo shard (its own process, as shards
are) over unary plaintext, unary mTLS (rpc.tls, the local CA) and the stream transport (gateway.transport,
plaintext), next to a raw TCP socket echo of the same bytes (its own process too: the floor), one caller thread
as the gateway's fan-out, 16 KiB .. 8 MiB of bf16 hidden states. Calls rotate between the modes, so machine
noise hits all alike. Also the time to a first answer on a fresh connection (TCP + TLS handshake). Writes
benchmarks/results/transport.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.gateway.transport import StreamTransport
from elasticmoe.rpc.bench import EchoShard, make_request, percentiles
from elasticmoe.rpc.codec import channel_options, server_options

OUT = Path(__file__).parent / "results" / "transport.json"
# bf16 hidden [tokens, 4096]: 8 KiB per token; calls timed per mode at that size
SIZES = {"16 KiB": (2, 400), "64 KiB": (8, 300), "256 KiB": (32, 200), "1 MiB": (128, 100), "8 MiB": (1024, 30)}
_HEADER = struct.Struct("<Q")  # the socket echo's frame: 8-byte little-endian length, then the bytes


class StreamEcho(EchoShard):
    """EchoShard with RunExpertsStream: each frame answered in order with the same id."""

    async def RunExpertsStream(self, request_iterator, context):
        async for frame in request_iterator:
            yield pb.RunExpertsReply(id=frame.id, response=await self.RunExperts(frame.request, context))


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    while view:
        n = conn.recv_into(view)
        if n == 0:
            raise ConnectionError("socket echo: peer closed")
        view = view[n:]


def _echo_conn(conn: socket.socket) -> None:
    head, buf = bytearray(_HEADER.size), bytearray()
    with conn:
        try:
            while True:
                _recv_into(conn, memoryview(head))
                (n,) = _HEADER.unpack(head)
                if len(buf) < n:
                    buf = bytearray(n)
                _recv_into(conn, memoryview(buf)[:n])
                conn.sendall(head)
                conn.sendall(memoryview(buf)[:n])
        except ConnectionError:
            return


def _serve_socket() -> None:
    import threading

    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    threading.Thread(target=lambda: sys.stdin.read() and None or os._exit(0), daemon=True).start()
    while True:
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_echo_conn, args=(conn,), daemon=True).start()


class SocketEcho:
    """The floor: the same payload bytes, length-prefixed, echoed over one TCP connection (no codec at all)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.conn = socket.create_connection((host, int(port)))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head, self.buf = bytearray(_HEADER.size), bytearray()

    def call(self, payload: bytes) -> None:
        if len(self.buf) < len(payload):
            self.buf = bytearray(len(payload))
        self.conn.sendall(_HEADER.pack(len(payload)))
        self.conn.sendall(payload)
        _recv_into(self.conn, memoryview(self.head))
        _recv_into(self.conn, memoryview(self.buf)[:_HEADER.unpack(self.head)[0]])


async def _serve(secure: bool) -> None:
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_ExpertShardServicer_to_server(StreamEcho(), server)
    port = tls.add_port(server, "127.0.0.1:0", insecure=not secure)
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    await server.stop(None)


def _spawn(mode: str) -> tuple[subprocess.Popen, str]:
    """mode: plaintext, mtls or socket."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--serve", *(["--secure"] if mode == "mtls" else []),
           *(["--socket"] if mode == "socket" else [])]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return proc, f"127.0.0.1:{int(proc.stdout.readline())}"


def _channel(target: str, secure: bool) -> grpc.Channel:
    return tls.channel(target, channel_options(), insecure=not secure)


def _callers(targets: dict[str, str], req: pb.RunExpertsRequest, stream: StreamTransport,
             sock: SocketEcho) -> dict:
    """One blocking round trip per mode, each on its long-lived channel, stream or connection."""
    unary = {m: pb_grpc.ExpertShardStub(_channel(targets[m], m == "mtls")) for m in ("plaintext", "mtls")}
    payload = req.hidden.data
    return {"plaintext": lambda: unary["plaintext"].RunExperts(req, timeout=30),
            "mtls": lambda: unary["mtls"].RunExperts(req, timeout=30),
            "stream": lambda: stream.send(targets["plaintext"], lambda: req, 30).result(),
            "socket": lambda: sock.call(payload)}


def round_trips(callers: dict, calls: int, warmup: int = 20) -> dict:
    """Rotating calls over the modes: latency percentiles per mode."""
    samples: dict[str, list[int]] = {m: [] for m in callers}
    order = list(callers.items())
    for i in range(warmup + calls):
        for m, call in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter_ns()
            call()
            if i >= warmup:
                samples[m].append(time.perf_counter_ns() - t0)
    return {m: percentiles(s) for m, s in samples.items()}


def first_calls(targets: dict[str, str], n: int) -> dict:
    """A fresh channel per call: connection set-up (and the TLS handshake) plus one Health round trip."""
    samples: dict[str, list[int]] = {m: [] for m in ("plaintext", "mtls")}
    for _ in range(n):
        for m in samples:
            t = targets[m]
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


def _size(callers: dict, payload: int, calls: int) -> dict:
    r = round_trips(callers, calls)
    for m in callers:  # bytes both ways per round trip at the median
        r[m]["gb_s"] = 2 * payload / (r[m]["p50_us"] * 1e3)
    r["payload_bytes"], r["calls"] = payload, calls
    r["ratio_p50"] = r["mtls"]["p50_us"] / r["plaintext"]["p50_us"]
    r["ratio_mean"] = r["mtls"]["mean_us"] / r["plaintext"]["mean_us"]
    for m in ("plaintext", "mtls", "stream"):  # x the socket floor's latency; fraction of its throughput
        r[f"{m}_vs_socket_p50"] = r[m]["p50_us"] / r["socket"]["p50_us"]
        r[f"{m}_of_socket_gb_s"] = r[m]["gb_s"] / r["socket"]["gb_s"]
    return r


def targets_met(sizes: dict) -> dict:
    """The issue's targets for the stream transport: >= 1 MiB at >= 50% of the socket's throughput,
    <= 64 KiB at p50 within 2x of the socket's."""
    out = {}
    for name, r in sizes.items():
        if r["payload_bytes"] >= 1 << 20:
            out[name] = {"target": ">= 0.5 of socket GB/s", "value": r["stream_of_socket_gb_s"],
                         "met": r["stream_of_socket_gb_s"] >= 0.5}
        elif r["payload_bytes"] <= 64 << 10:
            out[name] = {"target": "p50 <= 2x socket", "value": r["stream_vs_socket_p50"],
                         "met": r["stream_vs_socket_p50"] <= 2.0}
    return out


def run(scale: float, connects: int, sizes: list[str]) -> dict:
    procs, targets = [], {}
    for mode in ("plaintext", "mtls", "socket"):
        proc, target = _spawn(mode)
        procs.append(proc)
        targets[mode] = target
    stream, sock = StreamTransport(insecure=True), SocketEcho(targets["socket"])
    try:
        out = {}
        for name in sizes:
            tokens, calls = SIZES[name]
            req = make_request(tokens)
            out[name] = _size(_callers(targets, req, stream, sock), len(req.hidden.data), max(10, int(calls * scale)))
        conn = first_calls(targets, connects)
        conn["ratio_p50"] = conn["mtls"]["p50_us"] / conn["plaintext"]["p50_us"]
    finally:
        stream.close()
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "grpc": grpc.__version__,
            "round_trip": out, "targets": targets_met(out), "new_connection": conn,
            "note": "echo shard / socket echo each in its own process on 127.0.0.1; one caller thread; modes rotate; "
                    "gb_s = 2 x payload / p50 (both ways); stream = gateway.transport.StreamTransport, plaintext"}


def table(res: dict) -> str:
    """Markdown: p50 / p99 latency and GB/s per mode and payload, with ratios to the socket floor."""
    modes = ("socket", "plaintext", "mtls", "stream")
    lines = ["| payload | " + " | ".join(f"{m} p50 / p99 us, GB/s" for m in modes)
             + " | unary / socket p50 | stream / socket p50 | stream / socket GB/s |",
             "|---" * (len(modes) + 4) + "|"]
    for name, r in res["round_trip"].items():
        cells = [f"{r[m]['p50_us']:.0f} / {r[m]['p99_us']:.0f}, {r[m]['gb_s']:.2f}" for m in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['plaintext_vs_socket_p50']:.2f}x"
                     f" | {r['stream_vs_socket_p50']:.2f}x | {r['stream_of_socket_gb_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve", action="store_true", help="(internal) run one echo shard, print its port")
    p.add_argument("--secure", action="store_true", help="(internal) the echo shard requires mTLS")
    p.add_argument("--socket", action="store_true", help="(internal) run the raw TCP socket echo instead")
    p.add_argument("--scale", type=float, default=1.0, help="x the calls timed per size")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--connects", type=int, default=50)
    p.add_argument("--json", default=str(OUT))
    a = p.parse_args(argv)
    if a.serve and a.socket:
        _serve_socket()
        return 0
    if a.serve:
        asyncio.run(_serve(a.secure))
        return 0
    res = run(a.scale, a.connects, a.sizes.split(","))
    print(f"{res['cpu']} ({res['cpus']} CPUs), grpc {res['grpc']}")
    print(table(res))
    c = res["new_connection"]
    print(f"{'connect':>10} {c['plaintext']['p50_us']:>11.0f} us {c['mtls']['p50_us']:>7.0f} us {c['ratio_p50']:>10.3f}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
