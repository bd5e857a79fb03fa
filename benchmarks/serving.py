"""Serving benchmark: (a) the served cluster over gRPC (through Serve's proxy, and through the gateway's direct_grpc
port), (b) LLM.generate in one process, (c) transformers generate, (d) the served design without Ray Serve
(benchmarks/direct.py), (e) with `--engine-port`, (d)'s engine behind the gateway's gRPC port, clients in another
process (the served request path without Ray).

Output tokens/s, TTFT and TPOT p50/p99 at several concurrencies, plus the gateway's fan-out overhead per
(layer, step). Starts (and stops) its own local Ray on 127.0.0.1. Prints a table and writes JSON.
`--no-serve` leaves out (a) and needs no Ray: with `--device cuda` it is the GPU run of (b), (c) and (d).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
# benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
from direct import DirectCluster, run_queued  # benchmarks/direct.py
from machine import cores_used, cpu_seconds_by_role, stamp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
PROMPT = "The mixture of experts model routes every token to a few experts, and the request number"


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def _row(system: str, conc: int, tokens: int, wall: float, ttft: list[float], tpot: list[float]) -> dict:
    return {"system": system, "concurrency": conc, "tok_s": tokens / wall, "ttft_p50_ms": _pct(ttft, 50),
            "ttft_p99_ms": _pct(ttft, 99), "tpot_p50_ms": _pct(tpot, 50), "tpot_p99_ms": _pct(tpot, 99)}


def bench_offline(llm, conc: int, n: int) -> dict:
    """(b): all requests queued at once in one process; per-token times from the engine loop."""
    wall, ttft, tpot = run_queued(llm.engine, llm.encode, PROMPT, conc, n)
    return _row("LLM.generate (1 process)", conc, conc * n, wall, ttft, tpot)


def bench_hf(model, tok, conc: int, n: int) -> dict:
    """(c): one padded batch through transformers generate; TTFT = a 1-token generate of the same batch."""
    tok.padding_side = "left"
    enc = tok([f"{PROMPT} {i}" for i in range(conc)], return_tensors="pt", padding=True).to(model.device)

    def gen(k):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=tok.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first, wall = gen(1), gen(n)
    return _row("transformers generate (padded)", conc, conc * n, wall, [first] * conc,
                [(wall - first) / (n - 1)] * conc)


def bench_direct(cluster: DirectCluster, conc: int, n: int) -> dict:
    """(d): the served design without Serve: the gateway's engine here, 2 shard processes, all requests at once."""
    cores, wall, ttft, tpot = cluster.run(PROMPT, conc, n)
    row = _row("direct: gateway engine + 2 shards (no Serve)", conc, conc * n, wall, ttft, tpot)
    over = list(cluster.dispatcher.fanout_overhead_s)  # gateway wait - shard compute, per (layer, step)
    row.update(cores_busy=cores, fanout_p50_ms=_pct(over, 50), fanout_p99_ms=_pct(over, 99), fanout_samples=len(over))
    return row


DIRECT_PORT = 9100  # the served app's direct_grpc port
ENGINE_PORT = 9101  # row (e)'s port, on the direct cluster's engine in this process
INGRESS = {"proxy": ("127.0.0.1:9000", "served: gateway + 2 shards (Serve's gRPC proxy)"),
           "port": (f"127.0.0.1:{DIRECT_PORT}", "served-port: gateway + 2 shards (direct_grpc port)"),
           "engine": (f"127.0.0.1:{ENGINE_PORT}", "engine-port: (d) + the gateway's gRPC port (no Ray)")}


def _clients(conc: int, n: int, rounds: int, out) -> None:
    """Row (e)'s clients, in a process of their own (as (a)'s are beside the served gateway's process)."""
    bench_served(2, 4, 1, "engine")  # warm-up
    row = bench_served(conc, n, rounds, "engine")
    row.pop("cores_busy")  # by role, the roles of (a)'s processes: not this layout's
    out.put(row)


def bench_engine_port(cluster: DirectCluster, concs: list[int], n: int, rounds: int) -> list[dict]:
    """(e): (d)'s engine behind the gateway's own gRPC port (DirectIngress, EngineRunner, GenerationService) in
    this process, streaming to client threads in another process: the served request path without Ray."""
    import multiprocessing as mp

    cluster.serve_port(ENGINE_PORT)
    ctx, rows = mp.get_context("spawn"), []
    for c in concs:
        out = ctx.Queue()
        p = ctx.Process(target=_clients, args=(c, n, rounds, out))
        p.start()
        try:
            rows.append(out.get(timeout=600))
            p.join(timeout=60)
        finally:  # a client process that failed or hung is not left behind (nor joined forever at exit)
            if p.is_alive():
                p.kill()
                p.join()
    return rows


def bench_served(conc: int, n: int, rounds: int, ingress: str = "proxy") -> dict:
    """(a): `conc` client threads, each streaming `rounds` requests through Serve's gRPC proxy (or, with
    ingress="port", to the gateway replica's own `direct_grpc` port)."""
    from elasticmoe.client import GenerationClient

    address, system = INGRESS[ingress]

    ttft, tpot, total, errors = [], [], [0], []
    lock = threading.Lock()

    def client(i: int):
        try:
            requests(i)
        except Exception as e:  # noqa: BLE001 - raised below: a row without this client's requests is no row
            errors.append(e)

    def requests(i: int):
        c = GenerationClient(address, app="bench")
        for r in range(rounds):
            t0 = time.perf_counter()
            stamps = []
            for msg in c.stream(f"{PROMPT} {i} {r}", max_tokens=n, temperature=0.0, ignore_eos=True):
                stamps.extend([time.perf_counter()] * len(msg.token_ids))
            with lock:
                ttft.append(stamps[0] - t0)
                tpot.append((stamps[-1] - stamps[0]) / max(1, len(stamps) - 1))
                total[0] += len(stamps)

    t0, cpu0 = time.perf_counter(), cpu_seconds_by_role(os.getpid())
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{system}, concurrency {conc}: {len(errors)} of {conc} clients failed") from errors[0]
    row = _row(system, conc, total[0], wall, ttft, tpot)
    row["cores_busy"] = cores_used(cpu0, cpu_seconds_by_role(os.getpid()), wall)  # by role, during the run
    return row


def deploy(model_dir: Path, shards: int, transport: str | None = None, micro_batches: int | None = None) -> None:
    import yaml

    from elasticmoe import local_cluster as lc

    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
           "grpc_options": {"port": 9000, "grpc_servicer_functions": [
               "elasticmoe.rpc.serve_proxy.add_generation_servicer"]},
           "applications": [{"name": "bench", "route_prefix": "/bench", "import_path": "elasticmoe.app:build_app",
                             "args": {"model": str(model_dir), "num_shards": shards,
                                      "direct_grpc": {"port": DIRECT_PORT},
                                      "gateway_resources": {"num_cpus": 1}, "shard_resources": {"num_cpus": 1},
                                      "limits": {"max_num_seqs": 32, "max_model_len": 512, "max_queue": 256,
                                                 **({"transport": transport} if transport else {}),
                                                 **({"micro_batches": micro_batches} if micro_batches else {})}}}]}
    path = model_dir.parent / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    lc.stop_ray()
    lc.start_ray(num_cpus=8)
    lc.serve_deploy(path)
    lc.wait_running("bench")


def default_transport() -> str:
    """Limits' default transport; "socket" (that default) where pydantic is missing, as on a bare GPU image."""
    try:
        from elasticmoe.config import Limits
    except ImportError:
        return "socket"
    return Limits().transport


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serving.json"))
    ap.add_argument("--transport", choices=("unary", "stream", "socket"),
                    help="the gateway's Limits.transport (default: the config's default)")
    ap.add_argument("--micro-batches", type=int, help="the gateway's Limits.micro_batches (default: 1 on CPU)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--no-serve", action="store_true", help="leave out the served rows (a): no Ray needed")
    ap.add_argument("--engine-port", action="store_true", help="add row (e): (d)'s engine behind the gateway's gRPC "
                    "port, clients in another process (no Ray)")
    ap.add_argument("--ingress", default="proxy,port", help="served rows through Serve's gRPC proxy (proxy), the "
                    "gateway's direct_grpc port (port), or both, alternating")
    a = ap.parse_args(argv)
    if bad := [i for i in a.ingress.split(",") if i not in INGRESS]:
        ap.error(f"--ingress: {', '.join(bad)}: want {' or '.join(INGRESS)}, comma-separated")
    a.dtype = a.dtype or ("float32" if a.device == "cpu" else "bfloat16")
    if a.device == "cuda" and not a.no_serve:
        ap.error("--device cuda runs (b), (c) and (d) only: add --no-serve (the served app's GPU placement is "
                 "the deployment's, not this script's)")
    if a.no_serve and a.out == ap.get_default("out"):
        a.out = str(Path(a.out).with_name(f"serving-noserve-{a.device}.json"))
    return a


def main() -> None:
    a = parse_args()
    from elasticmoe import local_cluster as lc

    if not a.no_serve:  # its own loopback cluster; before Ray's import, which reads the settings
        lc.use_local_ray_env("127.0.0.1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elasticmoe import LLM
    from elasticmoe.model.tiny import make_tiny_model

    model_dir = make_tiny_model("mixtral", Path(tempfile.mkdtemp()) / "m", layers=a.layers, experts=a.experts,
                                hidden=a.hidden, intermediate=a.intermediate, heads=8, kv_heads=4)
    concs = [int(c) for c in a.concurrency.split(",")]
    llm = LLM(str(model_dir), device=a.device, dtype=a.dtype, max_num_seqs=max(concs))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, a.dtype)).to(a.device).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    bench_offline(llm, 2, 4)  # warm-ups: the first generate of each pays its one-time costs untimed
    bench_hf(hf, tok, 2, 4)
    for c in concs:
        rows += [bench_offline(llm, c, a.tokens), bench_hf(hf, tok, c, a.tokens)]
    del llm, hf
    direct = DirectCluster(str(model_dir), 2, a.transport or default_transport(), device=a.device, dtype=a.dtype)
    try:
        bench_direct(direct, 2, 4)  # warm-up
        rows += [bench_direct(direct, c, a.tokens) for c in concs]
        if a.engine_port:
            rows += bench_engine_port(direct, concs, a.tokens, a.rounds)
    finally:
        direct.close()
    if a.no_serve:
        _report(a, rows, None)
        return
    try:  # stop_ray also when the deploy fails: no Ray left running
        deploy(model_dir, 2, a.transport, a.micro_batches)
        ingresses = a.ingress.split(",")
        for ing in ingresses:
            bench_served(2, 4, 1, ing)  # warm-up
        for c in concs:
            rows += [bench_served(c, a.tokens, a.rounds, ing) for ing in ingresses]
        import ray
        from ray import serve

        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        fan = serve.get_deployment_handle("Gateway", app_name="bench").stats.remote().result()
    finally:
        lc.stop_ray()
    _report(a, rows, fan)


def _report(a, rows: list[dict], fan: dict | None) -> None:
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else None
    where = gpu or f"CPU ({os.cpu_count()} vCPUs)"
    print(f"\nmodel: mixtral-like {a.layers} layers x {a.experts} experts, hidden {a.hidden}, I {a.intermediate}, "
          f"{a.dtype} on {where}, {a.tokens} output tokens per request, greedy")
    print(f"{'system':<52}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>8}  (ms)")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["system"])):
        print(f"{r['system']:<52}{r['concurrency']:>5}{r['tok_s']:>9.1f}{r['ttft_p50_ms']:>10.1f}"
              f"{r['ttft_p99_ms']:>8.1f}{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>8.1f}")
    for r in rows:
        if "cores_busy" in r:
            busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores_busy"].items(), key=lambda kv: -kv[1]))
            who = r["system"].split(":")[0]
            print(f"concurrency {r['concurrency']}, {who}: cores busy {sum(r['cores_busy'].values()):.2f} of "
                  f"{os.cpu_count()} ({busy})")
    for c in sorted({r["concurrency"] for r in rows}):
        by = {r["system"].split(":")[0].split(" ")[0]: r["tok_s"] for r in rows if r["concurrency"] == c}
        ratios = [("served", "transformers"), ("served", "LLM.generate"), ("served-port", "LLM.generate"),
                  ("direct", "LLM.generate"), ("engine-port", "LLM.generate"), ("served", "direct"),
                  ("served-port", "direct"), ("served-port", "engine-port"),
                  ("LLM.generate", "transformers")]
        ratios = [(x, y) for x, y in ratios if x in by and y in by]
        print(f"concurrency {c}: " + ", ".join(f"{x} / {y} = {by[x] / by[y]:.2f}x" for x, y in ratios))
    for r in rows:
        if "fanout_p50_ms" in r:
            print(f"concurrency {r['concurrency']}, direct: fan-out overhead per (layer, step) p50 "
                  f"{r['fanout_p50_ms']:.3f} ms, p99 {r['fanout_p99_ms']:.3f} ms over {r['fanout_samples']} samples")
    if fan is not None:
        p50, p99 = fan.get("fanout_overhead_p50_s"), fan.get("fanout_overhead_p99_s")
        print(f"fan-out overhead per (layer, step) = gateway wait - shard compute: p50 {p50 * 1e3:.3f} ms, "
              f"p99 {p99 * 1e3:.3f} ms over {fan.get('fanout_samples')} samples")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**stamp(), "gpu": gpu, "args": vars(a),
                                       "rows": rows, "fanout": fan}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
