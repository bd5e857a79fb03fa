"""One expert shard's fixed cost per call, in process: a request frame's bytes to its reply frame's bytes through the
shard's own path (ExpertServicer.serve_frames: checks, holding check, stats, fused_moe, reply), at the served
benchmark's shapes by default (tiny Mixtral 8 layers x 8 experts, hidden 256, expert intermediate 512, fp32, top-2;
a shard of two holding 4 experts; 16 tokens a step). Issue 14: this per-layer cost bounds served throughput.

Times are the calling thread's CPU time (time.thread_time_ns: a shared machine's other processes do not count),
per call: p10 and p50 of the whole call, of the C kernel's share (cpu_gemm's two calls a layer) and of the rest
(Python and torch's small ops), then each stage's p50. --no-kernel skips the kernel's sums (outputs are then
garbage) to time the rest with warm caches. Compare two checkouts back to back, alternating (PYTHONPATH=...).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from elasticmoe.experts.run_checks import decode_run
from elasticmoe.experts.server import ExpertServicer
from elasticmoe.kernels import cpu_gemm
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import frames

STAGES = ("decode_frame", "decode_run", "routed_missing", "forward", "count", "reply")


class KernelClock:
    """cpu_gemm's loaded library with each call timed (thread CPU ns into `spent`), or skipped (`skip`)."""

    def __init__(self, lib):
        self.lib, self.spent, self.skip = lib, 0, False

    def __getattr__(self, name):
        fn = getattr(self.lib, name)

        def call(*args):
            t0 = time.thread_time_ns()
            if not self.skip:
                fn(*args)
            self.spent += time.thread_time_ns() - t0
        return call


def requests(a, spec, held: int) -> list[bytes]:
    """64 request frames as a gateway sends this shard its share of a step: the tokens routing to one of its experts
    (ids of the others' -1), top-k of a random router."""
    g, out = torch.Generator().manual_seed(0), []
    for i in range(64):
        weights, ids = torch.topk(torch.randn(a.tokens, a.experts, generator=g).softmax(-1), a.top_k)  # [T, k]
        mine = ids < held
        rows = mine.any(1)
        hidden = torch.randn(a.tokens, spec.hidden_size, generator=g)[rows]
        req = frames.ExpertRequest(spec.moe.moe_layers[i % len(spec.moe.moe_layers)], hidden,
                                   torch.where(mine, ids, -1)[rows].to(torch.int32), weights[rows].float(), 0, i)
        out.append(frames.request_frame(i, req))
    return out


def p(values: list[int], q: float) -> float:
    return sorted(values)[int(q * (len(values) - 1))] / 1e3


def stages(servicer: ExpertServicer, bufs: list[bytes], calls: int) -> dict[str, list[int]]:
    """Each stage of _compute's path timed apart (thread CPU ns), as the servicer runs them."""
    store, spent = servicer.store, {k: [] for k in STAGES}
    for i in range(calls):
        t = [time.thread_time_ns()]
        frame = frames.decode_request(bufs[i % len(bufs)])
        t.append(time.thread_time_ns())
        hidden, ids, weights = decode_run(frame, None, store.spec, servicer.max_rows, store.device, store.dtype)
        t.append(time.thread_time_ns())
        snap = store.snapshot(frame.layer)
        routed = store.routed(ids)
        missing = store.missing(frame.layer, routed, snap)
        t.append(time.thread_time_ns())
        with store.computing():
            out = store.forward(frame.layer, hidden, ids, weights, snap)
        t.append(time.thread_time_ns())
        store.count(frame.layer, routed, 1, frame.duplicate)
        t.append(time.thread_time_ns())
        b"".join(frames.reply_parts(frame.id, out, missing, 1, 0))
        t.append(time.thread_time_ns())
        for k, t0, t1 in zip(STAGES, t, t[1:]):
            spent[k].append(t1 - t0)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--held", type=int, default=4, help="experts this shard holds (ids 0..held-1)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16, help="tokens a step (the served benchmark's concurrency)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a shard's: its num_cpus)")
    ap.add_argument("--no-kernel", action="store_true", help="skip the C kernel's sums: the rest alone, caches warm")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = make_tiny_model("mixtral", Path(tempfile.mkdtemp()) / "m", layers=a.layers, experts=a.experts,
                            hidden=a.hidden, intermediate=a.intermediate, top_k=a.top_k)
    files = open_model(str(model))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(layer, e) for layer in files.spec.moe.moe_layers for e in range(a.held)])
    servicer, replies = ExpertServicer(store, "bench"), []
    clock = KernelClock(cpu_gemm._load()) if cpu_gemm.available() else None
    if clock:
        cpu_gemm._lib = clock  # the loaded kernel, timed (seg_gemm calls it through _load())
    bufs = requests(a, files.spec, a.held)
    put = replies.append
    for buf in bufs * 4:  # warm up; then one pass whose replies are hashed (equal across checkouts: same bits)
        servicer.serve_frames([frames.decode_request(buf)], put)
    replies.clear()
    for buf in bufs:
        servicer.serve_frames([frames.decode_request(buf)], lambda parts: replies.append(b"".join(parts)))
    digest = hashlib.sha256(b"".join(r[:8] + r[48:] for r in replies)).hexdigest()[:16]  # without compute_us
    if clock:
        clock.skip = a.no_kernel
    whole, kernel = [], []
    for i in range(a.calls):
        spent0, t0 = clock.spent if clock else 0, time.thread_time_ns()
        servicer.serve_frames([frames.decode_request(bufs[i % len(bufs)])], put)
        whole.append(time.thread_time_ns() - t0)
        kernel.append((clock.spent if clock else 0) - spent0)
        replies.clear()
    rest = [w - k for w, k in zip(whole, kernel)]
    print(f"replies {digest}; us/call p10 / p50: call {p(whole, .1):.1f} / {p(whole, .5):.1f}, kernel "
          f"{p(kernel, .1):.1f} / {p(kernel, .5):.1f}, rest {p(rest, .1):.1f} / {p(rest, .5):.1f}"
          f"{' (kernel skipped)' if a.no_kernel else ''}")
    spent = stages(servicer, bufs, a.calls)
    print("stages p50 us: " + ", ".join(f"{k} {statistics.median(v) / 1e3:.1f}" for k, v in spent.items()))


if __name__ == "__main__":
    main()
