"""The gateway's fixed cost per MoE layer: GrpcDispatcher's dispatch + wait over the socket transport to 2 real shards.

Two expert shard processes (experts 0-3 and 4-7 of every layer of a tiny Mixtral-like checkpoint: 8 layers x 8
experts, hidden 256, expert intermediate 512, fp32, top-2) and, in this process, the dispatcher running layer after
layer for 16 tokens (the served benchmark's concurrency 16). Prints, per layer: the engine thread's CPU (p10, p50),
the wall time of dispatch and of wait, the fan-out overhead (wait minus shard compute) and, with --stages, the CPU and
wall time of each stage (route, issue = group + build + encode + send, encode, sendmsg, wait's reads, poll = decode,
combine). --digest prints a hash of every output (old and new code must agree). For an A/B, run it alternately with
PYTHONPATH set to each checkout: the machine's load moves the figures by more than the difference.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LAYERS, EXPERTS, HIDDEN, INTERMEDIATE, TOP_K, TOKENS = 8, 8, 256, 512, 2, 16


def serve_shard(index: int, model: str) -> None:
    """One shard process: experts [index * 4, index * 4 + 4) of every layer, plaintext; prints its port."""
    from elasticmoe.experts.shard_server import start_server
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore

    torch.set_num_threads(1)
    files = open_model(model, check_shapes=False)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    mine = range(index * EXPERTS // 2, (index + 1) * EXPERTS // 2)
    store.load([(layer, e) for layer in files.spec.moe.moe_layers for e in mine])
    _server, _servicer, port = start_server(store, f"s{index}", insecure=True)
    print(port, flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    os._exit(0)


class Stages:
    """CPU (thread_time) and wall nanoseconds spent in named functions, wrapped in place."""

    def __init__(self):
        self.cpu: dict[str, int] = {}
        self.wall: dict[str, int] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        fn, cpu, wall = getattr(owner, name), self.cpu, self.wall
        cpu[label] = wall[label] = 0

        def timed(*args, **kwargs):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                wall[label] += time.perf_counter_ns() - t0
                cpu[label] += time.thread_time_ns() - c0
        setattr(owner, name, timed)

    def reset(self) -> None:
        for d in (self.cpu, self.wall):
            d.update(dict.fromkeys(d, 0))


def stages() -> Stages:
    from elasticmoe.gateway import failover, socket_reading, socket_transport
    from elasticmoe.rpc import frame_socket, frames

    st = Stages()
    for owner, name, label in [(failover.Step, "_route", "route"), (failover.Step, "_issue", "issue"),
                               (frames, "request_parts", "encode"), (frame_socket, "send_parts_nowait", "sendmsg"),
                               (socket_transport.SocketTransport, "wait", "transport.wait"),
                               (socket_reading.Reading, "read_ready", "read answers"),
                               (failover.Step, "_poll", "poll (decode)"), (failover.Step, "_combine", "combine")]:
        st.wrap(owner, name, label)
    return st


def inputs(n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """n steps' (hidden [T, H], topk_ids [T, k] int64, topk_weights [T, k]) as a softmax router gives them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        weights, ids = torch.topk(torch.softmax(torch.randn(TOKENS, EXPERTS, generator=g), -1), TOP_K)
        out.append((torch.randn(TOKENS, HIDDEN, generator=g), ids, weights))
    return out


def run_layers(d, steps: int, digest) -> dict[str, list[int]]:
    """steps x LAYERS layers, each dispatch then wait at once; per layer: CPU, dispatch and wait wall (ns)."""
    got: dict[str, list[int]] = {"cpu": [], "dispatch": [], "wait": []}
    steps_in = inputs()
    for s in range(steps):
        d.begin_step()
        for layer in range(LAYERS):
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            pending = d.dispatch(layer, *steps_in[s % len(steps_in)])
            t1 = time.perf_counter_ns()
            out = pending.wait()  # [T, H]
            t2, c2 = time.perf_counter_ns(), time.thread_time_ns()
            got["cpu"].append(c2 - c0)
            got["dispatch"].append(t1 - t0)
            got["wait"].append(t2 - t1)
            if digest is not None:
                digest.update(out.numpy().tobytes())
    return got


def gateway(model: str, steps: int, with_stages: bool, with_digest: bool) -> None:
    from elasticmoe.gateway.dispatcher import GrpcDispatcher
    from elasticmoe.gateway.routing import RoutingTable

    torch.set_num_threads(1)
    procs = [subprocess.Popen([sys.executable, __file__, "--shard", str(i), "--model", model], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    d = GrpcDispatcher(timeout_s=10, insecure=True, transport="socket")
    try:
        ports = [int(p.stdout.readline()) for p in procs]
        experts = [[(e * 2 // EXPERTS, 1.0)] for e in range(EXPERTS)]
        d.set_table(RoutingTable.from_dict({"version": 1, "layers": dict.fromkeys(range(LAYERS), experts),
                                            "shards": [{"id": f"s{i}", "address": f"127.0.0.1:{p}"}
                                                       for i, p in enumerate(ports)]}))
        st = stages() if with_stages else None
        run_layers(d, 20, None)  # connections, plans, caches
        d.fanout_overhead_s.clear()
        if st is not None:
            st.reset()
        digest = hashlib.sha1() if with_digest else None
        got = run_layers(d, steps, digest)
        report(got, sorted(d.fanout_overhead_s), st, digest)
    finally:
        d.close()
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(10)


def report(got: dict[str, list[int]], overhead: list[float], st: Stages | None, digest) -> None:
    n, cpu = len(got["cpu"]), sorted(got["cpu"])
    print(f"{n} layers: engine-thread CPU p10 {cpu[n // 10] / 1e3:.0f} us, p50 {cpu[n // 2] / 1e3:.0f} us; wall "
          f"dispatch {statistics.median(got['dispatch']) / 1e3:.0f} us, wait {statistics.median(got['wait']) / 1e3:.0f}"
          f" us (p50); fan-out overhead p50 {overhead[len(overhead) // 2] * 1e6:.0f} us")
    for label in st.cpu if st is not None else []:
        print(f"  {label:16s} CPU {st.cpu[label] / n / 1e3:7.1f} us   wall {st.wall[label] / n / 1e3:7.1f} us")
    if digest is not None:
        print(f"outputs sha1 {digest.hexdigest()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="engine steps timed (8 layers each)")
    ap.add_argument("--stages", action="store_true", help="time each stage too (its own cost is in the figures)")
    ap.add_argument("--digest", action="store_true", help="print a hash of every layer's output")
    ap.add_argument("--model", help="the checkpoint (default: a fresh tiny one)")
    ap.add_argument("--shard", type=int, help=argparse.SUPPRESS)  # internal: run one shard process
    a = ap.parse_args(argv)
    if a.shard is not None:
        serve_shard(a.shard, a.model)
        return
    if a.model is None:
        from elasticmoe.model.tiny import make_tiny_model

        a.model = str(make_tiny_model("mixtral", Path(tempfile.mkdtemp()) / "m", layers=LAYERS, experts=EXPERTS,
                                      hidden=HIDDEN, intermediate=INTERMEDIATE, heads=8, kv_heads=4))
    gateway(a.model, a.steps, a.stages, a.digest)


if __name__ == "__main__":
    main()
