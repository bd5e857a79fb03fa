"""Where a small round trip's time goes, rung by rung from the raw socket up to the socket transport, one run: bf16
hidden states (16 and 64 KiB by default) to one echo shard in its own process. Rungs, each adding one thing:
  socket        the floor: a raw TCP socket echo of the same bytes, length-prefixed (socket_echo.py)
  frames-raw    request frames built once, written with sendmsg to the echo shard's frame listener, each answer
                read whole on this thread (FrameReader), nothing decoded: the shard's frame work and the wire
  frames-codec  + the request frame built per call (frames.request_parts), the answer decoded (frames.decode_reply)
                and its output made a tensor (frame_types.as_tensor, as the dispatcher does): a minimal Python frame
                client
  frames-future + a concurrent.futures Future per call, resolved with the answer and read through result()
  transport     the socket transport as the dispatcher uses it (SocketTransport.send, then wait on this thread)
One caller thread; rungs rotate call by call; glibc malloc tuned everywhere. Writes
benchmarks/results/transport-ladder-<cpu>.json."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from concurrent.futures import Future

import grpc
import torch

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.codec import tune_malloc
from elasticmoe.rpc.frame_types import as_tensor
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
from transport import SIZES, SocketFanout, _fanout, _names, _request, _spawn, report, round_trips

RUNGS = ("socket", "frames-raw", "frames-codec", "frames-future", "transport")
DEFAULT_SIZES = ("16 KiB", "64 KiB")


class FrameClient:
    """One plain TCP connection to an echo shard's frame listener, driven inline: the rungs below the transport."""

    def __init__(self, target: str):
        channel = grpc.insecure_channel(target)
        port = pb_grpc.ExpertShardStub(channel).Health(pb.HealthRequest(), timeout=30).frame_port
        channel.close()
        self.sock = socket.create_connection((target.rsplit(":", 1)[0], port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = frame_socket.FrameReader(self.sock)
        self.ids = 0

    def _answer(self) -> memoryview:
        while not (got := self.reader.step()):  # [] until a whole frame is in
            if got is None:
                raise ConnectionError("the echo shard closed the connection")
        return got[0]

    def raw(self, parts: list) -> memoryview:
        self.sock.sendmsg(parts)
        return self._answer()

    def codec(self, req: frames.ExpertRequest) -> torch.Tensor:
        self.ids += 1
        self.sock.sendmsg(frames.request_parts(self.ids, req))
        return as_tensor(frames.decode_reply(self._answer()).output)

    def future(self, req: frames.ExpertRequest) -> torch.Tensor:
        self.ids += 1
        fut = Future()
        fut.set_running_or_notify_cancel()
        self.sock.sendmsg(frames.request_parts(self.ids, req))
        fut.set_result(frames.decode_reply(self._answer()))
        return as_tensor(fut.result().output)

    def close(self) -> None:
        self.sock.close()


def _case(targets: dict[str, str], tokens: int, calls: int, transport: SocketTransport) -> dict:
    req, payload = _request(tokens)
    floor, client = SocketFanout([targets["socket"]]), FrameClient(targets["frames"])
    parts = frames.request_parts(1, req)  # frames-raw: the same frame each call (the echo answers its id)
    try:
        want = req.hidden.view(torch.uint8)
        assert torch.equal(client.codec(req).view(torch.uint8), want), "the echo shard answered other bytes"
        callers = {"socket": lambda: floor.call(payload), "frames-raw": lambda: client.raw(parts),
                   "frames-codec": lambda: client.codec(req), "frames-future": lambda: client.future(req),
                   "transport": _fanout(transport, [targets["frames"]], req)}
        r = round_trips(callers, calls)
    finally:
        floor.close()
        client.close()
    for m in RUNGS[1:]:
        r[f"{m}_vs_socket_p50"] = r[m]["p50_us"] / r["socket"]["p50_us"]
    r.update(payload_bytes=len(payload), calls=calls)
    return r


def run(scale: float, sizes: list[str]) -> dict:
    load_before = os.getloadavg()
    procs, targets = [], {}
    transport = SocketTransport(insecure=True, unix=False)
    try:
        for kind, key in (("socket", "socket"), ("grpc", "frames")):
            proc, targets[key] = _spawn(kind)
            procs.append(proc)
        cases = {name: _case(targets, SIZES[name][0], max(20, int(SIZES[name][1] * 10 * scale)), transport)
                 for name in sizes}
    finally:
        transport.close()
        for p in procs:
            p.stdin.close()
            p.wait(timeout=30)
    return {**stamp(), "grpc": grpc.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "cases": cases,
            "note": "payload = bf16 hidden bytes; one echo shard (rpc_fanout.EchoShard's frame listener) and one "
                    "socket echo, each its own process on this host; one caller thread; rungs rotate; plaintext TCP"}


def table(res: dict) -> str:
    lines = ["| payload | " + " | ".join(f"{m} p50 / p99 ms" for m in RUNGS) + " | "
             + " | ".join(f"{m} / socket p50" for m in RUNGS[1:]) + " |", "|---" * (2 * len(RUNGS)) + "|"]
    for name, r in res["cases"].items():
        cells = [f"{r[m]['p50_us'] / 1e3:.3f} / {r[m]['p99_us'] / 1e3:.3f}" for m in RUNGS]
        ratios = [f"{r[f'{m}_vs_socket_p50']:.2f}x" for m in RUNGS[1:]]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", type=float, default=1.0, help="x the calls timed per case (16 KiB: 3000)")
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    p.add_argument("--json", help="default: benchmarks/results/transport-ladder-<cpu>.json")
    a = p.parse_args(argv)
    sizes = _names(p, "--sizes", a.sizes, SIZES)
    torch.set_num_threads(1)
    tune_malloc()
    res = run(a.scale, sizes)
    report(res, table(res), a.json, "transport-ladder", vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
