"""The served design without Ray Serve: the gateway's engine in this process, expert shards in their own processes;
optionally the gateway's gRPC port on that engine (serve_port)."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Callable

import torch
from machine import process_cpu_seconds  # benchmarks/machine.py


def run_queued(engine, encode: Callable[[str], list[int]], prompt: str, conc: int, n: int
               ) -> tuple[float, list[float], list[float]]:
    """`conc` requests ("{prompt} {i}") of n greedy tokens queued at once on `engine`, stepped until done:
    (wall s, TTFTs, TPOTs), per-token times from the engine loop."""
    from elasticmoe import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [engine.add_request(f"q{conc}-{i}-{time.time()}", encode(f"{prompt} {i}"), params) for i in range(conc)]
    stamps: dict[str, list[float]] = {s.request_id: [] for s in seqs}
    while engine.has_work():
        for s in engine.step():
            stamps[s.request_id].append(time.perf_counter())
    wall = time.perf_counter() - t0
    ttft = [v[0] - t0 for v in stamps.values()]
    tpot = [(v[-1] - v[0]) / (len(v) - 1) for v in stamps.values()]
    return wall, ttft, tpot


def _shard(model_dir: str, experts: list[int], threads: int, device: str, dtype: str, ready, stop) -> None:
    """One expert shard as the ExpertShard deployment runs it: `experts` of every MoE layer on `device`, mTLS,
    until `stop`."""
    dev = torch.device(device)  # a device torch does not know fails here, before the imports below (seconds)
    from elasticmoe.engine.engine import DTYPES
    from elasticmoe.experts.shard_server import start_server
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore
    from elasticmoe.rpc.codec import tune_malloc

    tune_malloc()
    torch.set_num_threads(threads)
    files = open_model(model_dir, check_shapes=False)  # as the ExpertShard deployment: no dense weights here
    store = ExpertStore(files.ckpt, files.names, files.spec, DTYPES[dtype], dev)
    store.load([(layer, e) for layer in files.spec.moe.moe_layers for e in experts])
    server, _, port = start_server(store, f"shard-{experts[0]}")
    ready.send(port)
    stop.recv()
    server.stop(None)


class DirectCluster:
    """`shards` shard processes holding contiguous, equal shares of the experts, and a gateway Engine here talking
    to them over `transport` (mTLS, the deployed default), with `threads` torch threads everywhere (as num_cpus 1).
    On "cuda" every process uses the one GPU (the gateway's dense half and each shard's experts)."""

    def __init__(self, model_dir: str, shards: int, transport: str, threads: int = 1, max_num_seqs: int = 32,
                 device: str = "cpu", dtype: str = "float32"):
        from elasticmoe.engine.engine import Engine
        from elasticmoe.gateway.dispatcher import GrpcDispatcher
        from elasticmoe.gateway.routing import RoutingTable
        from elasticmoe.model import open_model
        from elasticmoe.model.pipeline import default_micro_batches

        files = open_model(model_dir, check_shapes=False)  # the gateway's shape check once the shards are up
        num_experts = files.spec.moe.num_experts
        owner = [e * shards // num_experts for e in range(num_experts)]
        ctx = mp.get_context("spawn")
        self.procs, self.stops, readies, ports = [], [], [], []
        try:
            for s in range(shards):  # all started, then each waited for: their start-ups overlap
                ready_r, ready_w = ctx.Pipe(duplex=False)
                stop_r, stop_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_shard, args=(model_dir, [e for e in range(num_experts) if owner[e] == s],
                                                     threads, device, dtype, ready_w, stop_r), daemon=True)
                p.start()
                ready_w.close()  # the child's is the only write end left: its death ends recv (EOFError), no hang
                stop_r.close()
                self.procs.append(p)
                self.stops.append(stop_w)
                readies.append(ready_r)
            for s, (p, ready_r) in enumerate(zip(self.procs, readies)):
                try:
                    ports.append(ready_r.recv())
                except EOFError:
                    p.join(10)
                    raise RuntimeError(f"expert shard {s} exited before it served (exit code {p.exitcode})") from None
            files.names.check_mlp_shapes(files.config)  # open_model's check (the modeling import, ~5 s CPU)
        except BaseException:
            self._stop_shards()  # the shards already up are not left running
            raise
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.dispatcher = GrpcDispatcher(transport=transport)
        experts = [[(owner[e], 1.0)] for e in range(num_experts)]
        self.dispatcher.set_table(RoutingTable.from_dict({
            "version": 1, "layers": {layer: experts for layer in files.spec.moe.moe_layers},
            "shards": [{"id": f"shard-{s}", "address": f"127.0.0.1:{port}"} for s, port in enumerate(ports)]}))
        self.engine = Engine(files, self.dispatcher, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                             micro_batches=default_micro_batches(device))

    def run(self, prompt: str, conc: int, n: int) -> tuple[dict, float, list[float], list[float]]:
        """run_queued on the gateway engine: (cores busy by role, wall s, TTFTs, TPOTs); the fan-out overheads
        per (layer, step) of the run are in self.dispatcher.fanout_overhead_s afterwards."""
        pids = [p.pid for p in self.procs]
        self.dispatcher.fanout_overhead_s.clear()
        shards0, gw0 = sum(process_cpu_seconds(p) for p in pids), time.process_time()
        wall, ttft, tpot = run_queued(self.engine, self.engine.tokenizer.encode, prompt, conc, n)
        cores = {"gateway": round((time.process_time() - gw0) / wall, 3),
                 "expert shards": round((sum(process_cpu_seconds(p) for p in pids) - shards0) / wall, 3)}
        return cores, wall, ttft, tpot

    def serve_port(self, port: int) -> None:
        """The gateway's Generation gRPC port (its DirectIngress, engine runner and request handling) on this engine,
        at 127.0.0.1:port: the served request path without Ray (no keys, metrics kept in-process)."""
        from elasticmoe.gateway.auth import ApiKeys
        from elasticmoe.gateway.direct_ingress import DirectIngress
        from elasticmoe.gateway.generation_service import GenerationService
        from elasticmoe.gateway.runner import EngineRunner
        from elasticmoe.metrics import GatewayMetrics

        spec = self.engine.spec
        self.runner = EngineRunner(self.engine)
        self.tokenizer, self.api_keys = self.engine.tokenizer, ApiKeys(set())
        self.metrics = GatewayMetrics("off", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers, use_ray=False)
        self.ingress = DirectIngress(GenerationService(self), "127.0.0.1", port, max_rpcs=self.runner.capacity + 64)

    async def wait_ready(self) -> None:  # GenerationService's core: the shards are up once __init__ returns
        return None

    def close(self) -> None:
        if getattr(self, "ingress", None) is not None:
            self.ingress.stop(1.0)
            self.runner.close()
        self.dispatcher.close()
        self._stop_shards()
        torch.set_num_threads(self.threads_before)

    def _stop_shards(self) -> None:
        for stop in self.stops:
            try:
                stop.send(None)
            except OSError:  # that shard is gone already
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
