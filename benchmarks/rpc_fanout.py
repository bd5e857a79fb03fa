"""Microbenchmarks: tensor codec cost and ExpertShard fan-out latency from a synchronous thread (and the echo shard
that transport.py spawns)."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Protocol

import grpc
import torch
from machine import cpu_model, stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames
from elasticmoe.rpc.frame_service import add_shard_servicer
from elasticmoe.rpc.frame_listener import FrameListener
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor, server_options, tune_malloc

HOST = "127.0.0.1"


class EchoShard(pb_grpc.ExpertShardServicer):
    """Trivial shard: returns hidden decoded and re-encoded as the output (a shard's codec work, no compute)."""

    async def RunExperts(self, request: pb.RunExpertsRequest, context) -> pb.RunExpertsResponse:
        t0 = time.perf_counter_ns()
        hidden = decode_tensor(request.hidden, "RunExpertsRequest.hidden")
        response = pb.RunExpertsResponse(placement_version=request.placement_version)
        encode_tensor(hidden, out=response.output)
        response.compute_us = (time.perf_counter_ns() - t0) // 1000
        return response

    frame_port, frame_unix_path = 0, ""  # its frame listener's port and Unix socket (listen()), told by Health

    @staticmethod
    def echo(frame: frames.Request | frames.FrameError) -> list:
        """One raw frame's reply (frames.reply_parts): its hidden bytes as the output."""
        if isinstance(frame, frames.FrameError):
            return frames.reply_parts(frame.frame_id, code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error=str(frame))
        return frames.reply_parts(frame.id, frame.hidden, placement_version=frame.placement_version)

    async def RunExpertsStream(self, request_iterator, context):
        """Raw frames (rpc.frames): each answered in order with its hidden bytes as the output."""
        async for frame in request_iterator:
            yield b"".join(self.echo(frame))

    def serve_frames(self, requests, put) -> None:
        """The frame listener's connections (rpc.frame_listener): the same echo, in order."""
        for frame in requests:
            put(self.echo(frame))

    def listen(self, host: str = HOST, insecure: bool = True) -> FrameListener:
        """Start a frame listener for this shard on host (any port); Health tells its port and Unix socket."""
        listener = FrameListener(self.serve_frames, host, [0], insecure)
        self.frame_port, self.frame_unix_path = listener.port, listener.unix_path
        return listener

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return pb.HealthResponse(ok=True, shard_id=f"echo-{os.getpid()}", frame_port=self.frame_port,
                                 frame_unix_path=self.frame_unix_path)


async def start_echo_server(port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Starts an EchoShard grpc.aio server on 127.0.0.1 (port 0: ephemeral); returns it and its port."""
    server = grpc.aio.server(options=server_options())
    shard = EchoShard()
    add_shard_servicer(shard, server)
    port = server.add_insecure_port(f"{HOST}:{port}")
    shard.listen()  # plaintext frames beside it (the socket transport); lives as long as the process
    await server.start()
    return server, port


async def _serve_until_stdin_closes() -> None:
    server, port = await start_echo_server()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # parent closes stdin to stop us
    await server.stop(grace=None)


def spawn(cmd: list[str], **env: str) -> subprocess.Popen:
    """A server process (this checkout importable, `env` added to the environment); it prints its port(s) on its
    first stdout line and runs until its stdin closes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])),
               **env)
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def spawn_servers(n: int, malloc: bool) -> tuple[list[subprocess.Popen], list[str]]:
    """Starts n echo servers, one process each (like shards); returns the processes and targets."""
    procs = [spawn([sys.executable, __file__, "--serve", *(["--tune-malloc"] if malloc else [])]) for _ in range(n)]
    return procs, [f"{HOST}:{int(p.stdout.readline())}" for p in procs]


def make_request(tokens: int, hidden: int = 4096, k: int = 8) -> pb.RunExpertsRequest:
    """A RunExperts request with bf16 hidden [tokens, hidden]: 2 * tokens * hidden bytes of payload."""
    req = pb.RunExpertsRequest(layer=1, placement_version=1, step=1)
    encode_tensor(torch.randn(tokens, hidden).to(torch.bfloat16), out=req.hidden)
    encode_tensor(torch.randint(0, 64, (tokens, k), dtype=torch.int32), out=req.topk_ids)
    encode_tensor(torch.rand(tokens, k), out=req.topk_weights)
    return req


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in microseconds."""
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1e3  # noqa: E731
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99), "mean_us": statistics.fmean(s) / 1e3}


def timed(fn: Callable[[], object], calls: int, warmup: int = 30) -> dict[str, float]:
    """Runs fn warmup + calls times in the current thread; latency percentiles of the last `calls`."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return percentiles(samples)


def in_thread(fn: Callable[[], dict]) -> dict:
    """Runs fn in a fresh non-main thread (as the gateway's engine thread) and returns its result."""
    box: list[dict] = []
    worker = threading.Thread(target=lambda: box.append(fn()), name="engine")
    worker.start()
    worker.join()
    return box[0]


def bench_codec(calls: int, warmup: int = 30) -> dict[str, dict[str, float]]:
    """encode / decode / encode+decode (+ protobuf wire round trip) of a [64, 4096] bf16 and fp32 tensor."""
    out: dict[str, dict[str, float]] = {}
    for dtype in (torch.bfloat16, torch.float32):
        t = torch.randn(64, 4096).to(dtype)
        msg = encode_tensor(t)
        wire = msg.SerializeToString()
        name = f"[64,4096] {str(dtype).removeprefix('torch.')}"
        out[f"encode {name}"] = timed(lambda: encode_tensor(t), calls, warmup)
        out[f"decode {name}"] = timed(lambda: decode_tensor(msg), calls, warmup)
        out[f"encode+decode {name}"] = timed(lambda: decode_tensor(encode_tensor(t)), calls, warmup)
        out[f"encode+serialize+parse+decode {name}"] = timed(
            lambda: decode_tensor(pb.Tensor.FromString(encode_tensor(t).SerializeToString())), calls, warmup)
        out[f"parse+decode {name}"] = timed(lambda: decode_tensor(pb.Tensor.FromString(wire)), calls, warmup)
    return out


def _output(response: pb.RunExpertsResponse) -> torch.Tensor:
    return decode_tensor(response.output, "RunExpertsResponse.output")


Wait = Callable[[], list[torch.Tensor]]  # Pending.wait(): the shards' outputs [T, H] each


class Fanout(Protocol):
    """One fan-out mechanism: dispatch issues one RunExperts per shard and returns how to wait."""

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait: ...

    def close(self) -> None: ...


class BlockingCall:
    """Baseline for one shard: a plain blocking call in the engine thread (dispatch returns when done)."""

    def __init__(self, stub: pb_grpc.ExpertShardStub):
        self.stub = stub

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait:
        out = [_output(self.stub.RunExperts(req, timeout=10))]
        return lambda: out

    def close(self) -> None:
        pass


class SyncFutureFanout:
    """Sync stubs: dispatch issues every call with .future(); wait takes each result."""

    def __init__(self, stubs: list[pb_grpc.ExpertShardStub]):
        self.stubs = stubs

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait:
        futures = [stub.RunExperts.future(req, timeout=10) for stub in self.stubs]
        return lambda: [_output(f.result()) for f in futures]

    def close(self) -> None:
        pass


class ThreadPoolFanout:
    """Sync stubs' blocking calls, one per pool thread; wait blocks on the concurrent futures."""

    def __init__(self, stubs: list[pb_grpc.ExpertShardStub]):
        self.stubs = stubs
        self.pool = cf.ThreadPoolExecutor(max_workers=len(stubs), thread_name_prefix="fanout")

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait:
        futures = [self.pool.submit(stub.RunExperts, req, timeout=10) for stub in self.stubs]
        return lambda: [_output(f.result()) for f in futures]

    def close(self) -> None:
        self.pool.shutdown()


class LoopThreadFanout:
    """grpc.aio stubs on an asyncio loop in a background thread; wait blocks on a concurrent Future."""

    def __init__(self, targets: list[str]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rpc-loop", daemon=True)
        self.thread.start()
        self.channels, self.stubs = self._submit(self._open(targets)).result()

    def _submit(self, coro) -> cf.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _open(self, targets: list[str]):
        channels = [grpc.aio.insecure_channel(t, options=channel_options()) for t in targets]
        return channels, [pb_grpc.ExpertShardStub(c) for c in channels]

    async def _gather(self, req: pb.RunExpertsRequest) -> list[pb.RunExpertsResponse]:
        return await asyncio.gather(*(stub.RunExperts(req, timeout=10) for stub in self.stubs))

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait:
        future = self._submit(self._gather(req))
        return lambda: [_output(r) for r in future.result()]

    def close(self) -> None:
        async def _close() -> None:
            await asyncio.gather(*(c.close() for c in self.channels))
        self._submit(_close()).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class OwnLoopFanout:
    """grpc.aio stubs on an event loop owned by the engine thread, run only inside dispatch and wait.

    dispatch starts the calls and runs one loop pass (the requests go out); wait runs the loop until
    all answered. No other thread is involved; the loop and channels must stay on one thread.
    """

    def __init__(self, targets: list[str]):
        self.targets, self.loop, self.stubs = targets, None, []

    async def _start(self, req: pb.RunExpertsRequest) -> list[asyncio.Future]:
        if not self.stubs:
            self.channels = [grpc.aio.insecure_channel(t, options=channel_options()) for t in self.targets]
            self.stubs = [pb_grpc.ExpertShardStub(c) for c in self.channels]
        calls = [asyncio.ensure_future(stub.RunExperts(req, timeout=10)) for stub in self.stubs]
        await asyncio.sleep(0)
        return calls

    def dispatch(self, req: pb.RunExpertsRequest) -> Wait:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()  # created by (and bound to) the first caller's thread
        calls = self.loop.run_until_complete(self._start(req))
        return lambda: [_output(r) for r in self.loop.run_until_complete(asyncio.gather(*calls))]

    def close(self) -> None:
        pass  # the loop belongs to the engine thread; the benchmark process exits soon after


async def _aio_native(targets: list[str], req: pb.RunExpertsRequest, calls: int, warmup: int = 30
                      ) -> dict[str, float]:
    """Reference: the whole fan-out inside one event loop (no cross-thread hand-off); cpu_us as interleaved's,
    over the timed calls only (not the channels' set-up and the warm-up calls)."""
    channels = [grpc.aio.insecure_channel(t, options=channel_options()) for t in targets]
    stubs = [pb_grpc.ExpertShardStub(c) for c in channels]

    async def once() -> None:
        for r in await asyncio.gather(*(s.RunExperts(req, timeout=10) for s in stubs)):
            _output(r)
    for _ in range(warmup):
        await once()
    samples, c0 = [], time.process_time_ns()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await once()
        samples.append(time.perf_counter_ns() - t0)
    cpu_us = (time.process_time_ns() - c0) / calls / 1e3
    await asyncio.gather(*(c.close() for c in channels))
    return {**percentiles(samples), "cpu_us": cpu_us}


def interleaved(fans: dict[str, Callable[[], Wait]], calls: int, warmup: int = 30) -> dict[str, dict[str, float]]:
    """Times each dispatch+wait `calls` times round-robin (drift hits all alike).

    Adds dispatch_us (p50 time for dispatch to return: what the engine cannot overlap) and cpu_us
    (process CPU per fan-out, all threads).
    """
    for fan in fans.values():
        for _ in range(warmup):
            fan()()
    total: dict[str, list[int]] = {name: [] for name in fans}
    issue: dict[str, list[int]] = {name: [] for name in fans}
    cpu: dict[str, int] = dict.fromkeys(fans, 0)
    for _ in range(calls):
        for name, fan in fans.items():
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            wait = fan()
            t1 = time.perf_counter_ns()
            wait()
            total[name].append(time.perf_counter_ns() - t0)
            issue[name].append(t1 - t0)
            cpu[name] += time.process_time_ns() - c0
    return {name: {**percentiles(total[name]), "dispatch_us": percentiles(issue[name])["p50_us"],
                   "cpu_us": cpu[name] / calls / 1e3} for name in fans}


def bench_fanout(targets: list[str], req: pb.RunExpertsRequest, calls: int, warmup: int = 30
                 ) -> dict[str, dict[str, float]]:
    """p50... of one fan-out (len(targets) concurrent RunExperts, wait for all) per mechanism."""
    channels = [grpc.insecure_channel(t, options=channel_options()) for t in targets]
    stubs = [pb_grpc.ExpertShardStub(c) for c in channels]
    fanouts: dict[str, Fanout] = {"sync blocking call": BlockingCall(stubs[0])} if len(targets) == 1 else {}
    fanouts.update({"sync stub .future()": SyncFutureFanout(stubs),
                    "thread pool + sync blocking": ThreadPoolFanout(stubs),
                    "aio stubs on loop thread": LoopThreadFanout(targets),
                    "aio stubs on engine-owned loop": OwnLoopFanout(targets)})
    fans = {name: (lambda f=f: f.dispatch(req)) for name, f in fanouts.items()}
    out = in_thread(lambda: interleaved(fans, calls, warmup))
    for f in fanouts.values():
        f.close()
    for c in channels:
        c.close()
    out["aio native (in-loop ref.)"] = asyncio.run(_aio_native(targets, req, calls, warmup))
    return out


def print_results(results: dict[str, dict[str, dict[str, float]]], note: str) -> None:
    """One table per section; times in microseconds."""
    for section, rows in results.items():
        print(f"\n## {section}   ({note})")
        for name, r in rows.items():
            line = (f"  {name:34s} p50 {r['p50_us']:8.1f}  p90 {r['p90_us']:8.1f}  p99 {r['p99_us']:8.1f}"
                    f"  mean {r['mean_us']:8.1f}")
            line += f"  cpu {r['cpu_us']:7.1f}" if "cpu_us" in r else ""
            line += f"  dispatch {r['dispatch_us']:7.1f}" if "dispatch_us" in r else ""
            print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/rpc_fanout.py", description=__doc__)
    parser.add_argument("--serve", action="store_true", help="(internal) run one echo server, print its port")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls before each timed set")
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 3], help="fan-out widths to measure")
    parser.add_argument("--kib", type=int, nargs="+", default=[8, 64, 1024],
                        help="payload per call: bf16 hidden [KiB / 8, 4096]")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--tune-malloc", action="store_true", help="codec.tune_malloc() in client and servers")
    args = parser.parse_args(argv)
    if args.tune_malloc and not tune_malloc():
        print("warning: tune_malloc() failed", file=sys.stderr)
    if args.serve:
        asyncio.run(_serve_until_stdin_closes())
        return 0
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict[str, float]]] = {"codec": bench_codec(args.calls, args.warmup)}
    procs, targets = spawn_servers(max(args.servers), args.tune_malloc)
    try:
        for kib in args.kib:
            req = make_request(tokens=kib * 1024 // (2 * 4096))
            for n in args.servers:
                results[f"{kib} KiB x {n} shard(s)"] = bench_fanout(targets[:n], req, args.calls, args.warmup)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=10)
    print_results(results, f"{cpu_model()}, cpus={os.cpu_count()}, tune_malloc={args.tune_malloc}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": {**stamp(), "tune_malloc": args.tune_malloc, "args": vars(args)},
                       **results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
