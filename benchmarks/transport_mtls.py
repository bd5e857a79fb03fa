"""The mTLS cost of the three transports (`transport.py --only mtls` runs it): unary, stream and frames, plaintext
and mTLS (rpc.tls, a CA made in a temp dir) to one echo shard serving both ports, calls rotating; also a fresh
connection's first answer (TCP + TLS handshake). transport.py writes benchmarks/results/transport-mtls-<cpu>.json."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, server_options
from elasticmoe.rpc.frame_service import add_shard_servicer
from machine import stamp  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
from rpc_fanout import EchoShard, percentiles
from transport import MTLS_SIZES, MTLS_TARGET, _fanout, _request, _spawn, round_trips

MTLS_MODES = ("unary", "unary-mtls", "stream", "stream-mtls", "frames", "frames-mtls")
MTLS_KINDS = ("unary", "stream", "frames")


async def serve_mtls() -> None:
    """Echo shards (rpc_fanout.EchoShard, raw-frame stream and frame listener) in one process, a plaintext and an
    mTLS one: "plain secure"."""
    servers, ports = [], []
    for insecure in (True, False):
        server, shard = grpc.aio.server(options=server_options()), EchoShard()
        add_shard_servicer(shard, server)
        ports.append(tls.add_port(server, "127.0.0.1:0", insecure=insecure))
        shard.listen(insecure=insecure)
        await server.start()
        servers.append(server)
    print(*ports, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    for server in servers:
        await server.stop(None)


def _mtls_case(transports: dict, targets: dict, tokens: int, calls: int) -> dict:
    """Rotating unary / stream / frames, plaintext / mTLS calls to one shard; mTLS / plaintext latency ratios."""
    req, payload = _request(tokens)
    samples: dict[str, list[int]] = {}
    callers = {m: _fanout(transports[m], [targets[m]], req) for m in MTLS_MODES}
    r = round_trips(callers, calls, min(20, calls // 4), samples)
    r.update(payload_bytes=len(payload), calls=calls)
    for kind in MTLS_KINDS:
        plain, secure = r[kind], r[f"{kind}-mtls"]
        r[f"{kind}_mtls_ratio_p50"] = secure["p50_us"] / plain["p50_us"]
        r[f"{kind}_mtls_ratio_mean"] = secure["mean_us"] / plain["mean_us"]
        # each mTLS call over the plaintext call of the same rotation (adjacent in time), median
        r[f"{kind}_mtls_ratio_paired"] = statistics.median(
            s / p for s, p in zip(samples[f"{kind}-mtls"], samples[kind]))
    return r


def first_answers(plain: str, secure: str, n: int = 20) -> dict:
    """A fresh channel per call (no shared subchannel): TCP connect, the TLS handshake for mTLS, one Health."""
    samples: dict[str, list[int]] = {"plaintext": [], "mtls": []}
    for _ in range(n):
        for mode, target in (("plaintext", plain), ("mtls", secure)):
            t0 = time.perf_counter_ns()
            ch = tls.channel(target, channel_options() + [("grpc.use_local_subchannel_pool", 1)],
                             insecure=mode == "plaintext")
            try:
                pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=10)
            finally:
                ch.close()
            samples[mode].append(time.perf_counter_ns() - t0)
    return {m: percentiles(s) for m, s in samples.items()}


def run_mtls(scale: float, sizes: list[str] | None = None) -> dict:
    """The mTLS cost on one shard, with a release's credentials made in a temp dir and read as rpc.tls reads them;
    `sizes`: of MTLS_SIZES (default all)."""
    with tempfile.TemporaryDirectory() as d:
        files = tls.local_ca(Path(d))
        env = {tls.ENV_CA: str(files.ca), tls.ENV_CERT: str(files.cert), tls.ENV_KEY: str(files.key)}
        os.environ.update(env)  # the shard's server credentials and the transports' channels (inherited)
        proc, both = _spawn("mtls")
        plain, secure = both.split()
        targets = {m: secure if m.endswith("mtls") else plain for m in MTLS_MODES}
        kinds = {"unary": UnaryTransport, "stream": StreamTransport, "frames": SocketTransport}
        transports = {m: kinds[m.split("-")[0]](insecure=t == plain) for m, t in targets.items()}
        try:
            cases = {name: _mtls_case(transports, targets, tokens, max(8, int(calls * scale)))
                     for name, (tokens, calls) in ((n, MTLS_SIZES[n]) for n in sizes or MTLS_SIZES)}
            connect = first_answers(plain, secure)
        finally:
            for t in transports.values():
                t.close()
            proc.stdin.close()
            proc.wait(timeout=30)
            for k in env:
                os.environ.pop(k)
    met = {f"{name} {kind}": r[f"{kind}_mtls_ratio_p50"] <= MTLS_TARGET
           for name, r in cases.items() for kind in MTLS_KINDS}
    return {**stamp(), "grpc": grpc.__version__, "loadavg": os.getloadavg(),
            "target_p50_ratio": MTLS_TARGET,
            "cases": cases, "target_met": met, "new_connection": connect,
            "note": "1 echo shard (own process) serving a plaintext and an mTLS port; one caller thread; the four "
                    "modes rotate call by call; ECDSA P-256 certificates; channels kept open (handshake once); "
                    "frames = SocketTransport (Python ssl) to the shard's frame listeners, one plaintext, one mTLS"}


def mtls_table(res: dict) -> str:
    """Markdown: plaintext and mTLS p50 per transport and payload, mTLS / plaintext ratios."""
    lines = ["| payload | " + " | ".join(f"{k} p50 plain / mTLS ms | {k} mTLS / plain p50 (paired, mean)"
                                        for k in MTLS_KINDS) + " |", "|---" * (1 + 2 * len(MTLS_KINDS)) + "|"]
    for name, r in res["cases"].items():
        cells = [f"{r[k]['p50_us'] / 1e3:.2f} / {r[k + '-mtls']['p50_us'] / 1e3:.2f} | {r[k + '_mtls_ratio_p50']:.2f}x"
                 f" ({r[k + '_mtls_ratio_paired']:.2f}x, {r[k + '_mtls_ratio_mean']:.2f}x)"
                 for k in MTLS_KINDS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    c = res["new_connection"]
    lines.append(f"\nfresh connection + first Health p50: plaintext {c['plaintext']['p50_us'] / 1e3:.2f} ms, "
                 f"mTLS {c['mtls']['p50_us'] / 1e3:.2f} ms")
    return "\n".join(lines)
