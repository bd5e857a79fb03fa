"""Starting an expert shard: its gRPC server and the frame listener beside it, on a port of
ELASTICMOE_EXPERT_PORT_RANGE where one is set, stopped together (ShardServer)."""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures

import grpc

from elasticmoe.experts.server import PLACEMENT_CALLS, ExpertServicer
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import MAX_MESSAGE_BYTES, server_options
from elasticmoe.rpc.frame_listener import FrameListener
from elasticmoe.rpc.frame_service import add_shard_servicer
from elasticmoe.rpc.options import STREAM_REPLY_BYTES

log = logging.getLogger(__name__)
RESERVED_WORKERS = 4  # the pool's workers beyond RunExperts', the streams' and the placement calls': Health, stats


def _ports(port: int) -> list[int]:
    """The port to try: `port`, else ELASTICMOE_EXPERT_PORT_RANGE ("20100-20199", for network policies), else any."""
    span = os.environ.get("ELASTICMOE_EXPERT_PORT_RANGE")
    if port or not span:
        return [port]
    lo, _, hi = span.strip().partition("-")
    if not all(x.isascii() and x.isdigit() for x in (lo, hi)) or not 0 < int(lo) <= int(hi) <= 65535:
        raise ValueError(f"ELASTICMOE_EXPERT_PORT_RANGE={span!r}: expected 'low-high', ports 1-65535, low <= high")
    return list(range(int(lo), int(hi) + 1))


class ShardServer:
    """The shard's gRPC server and the frame listener beside it (same host, same TLS): stop(grace) stops both alike
    (None: connections end at once, their gateways fail their pending calls); the rest is the gRPC server's."""

    def __init__(self, server: grpc.Server, listener: FrameListener, servicer: ExpertServicer):
        self.server, self.listener, self.servicer = server, listener, servicer

    def stop(self, grace: float | None) -> threading.Event:
        """As grpc.Server.stop, for both: the Event is set once both have stopped and no frame of theirs is still
        being computed (the listener's connection threads and the streams' reading threads have returned)."""
        cut, stopped, both = self.listener.close(grace), self.server.stop(grace), threading.Event()

        def wait() -> None:
            cut.wait()
            stopped.wait()
            for reader in list(self.servicer.readers):
                reader.join()
            both.set()
        threading.Thread(target=wait, daemon=True).start()
        return both

    def __getattr__(self, name: str):
        return getattr(self.server, name)


def start_server(store: ExpertStore, shard_id: str, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8, max_rows: int = 1 << 16, insecure: bool = False, max_streams: int = 16,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_stream_reply_bytes: int = STREAM_REPLY_BYTES
                 ) -> tuple[ShardServer, ExpertServicer, int]:
    """Start a gRPC server for `store` on host:port (0 = any free port); returns (server, servicer, port).

    mTLS (rpc.tls): only clients holding a certificate of the release's CA get in; `insecure` serves plaintext.
    The pool has `max_workers` workers for RunExperts, one per open RunExpertsStream (at most `max_streams`, one per
    gateway using the stream transport; more are refused), one per LoadExperts / DropExperts running or waiting (at
    most server.PLACEMENT_CALLS; more are refused) and RESERVED_WORKERS more for Health and stats.
    Beside it, on the same host, a frame listener (rpc.frame_listener; its port in Health.frame_port, from
    ELASTICMOE_EXPERT_PORT_RANGE when set, and a Unix socket for gateways on this host, Health.frame_unix_path)
    serves the same frames through the same code (serve_frames), at most `max_streams` connections, same TLS. Both take messages up to `max_message_bytes`
    (ELASTICMOE_GRPC_MAX_MESSAGE_BYTES), which Health announces: a gateway keeps its calls within it. A stream's
    answers not yet sent on (its gateway slow to read) take at most `max_stream_reply_bytes`
    (ELASTICMOE_STREAM_REPLY_BYTES; one answer alone always goes) before its reader waits.
    """
    span = _ports(0)  # a bad ELASTICMOE_EXPERT_PORT_RANGE refused before anything starts
    if insecure:
        tls.warn_insecure(f"expert shard {shard_id}")
    files = None if insecure else tls.tls_files()
    bounded = max_workers + max_streams + PLACEMENT_CALLS  # workers the servicer's bounds let calls hold
    pool = futures.ThreadPoolExecutor(max_workers=bounded + RESERVED_WORKERS, thread_name_prefix="expert-rpc")
    # room for every worker's call plus RunExperts refusals queued: gRPC refuses more before a worker sees them
    server = grpc.server(pool, options=server_options(max_message_bytes),
                         maximum_concurrent_rpcs=bounded + 3 * max_workers + RESERVED_WORKERS)
    servicer = ExpertServicer(store, shard_id, run_slots=max_workers, max_rows=max_rows, max_streams=max_streams,
                              max_message_bytes=max_message_bytes, max_stream_reply_bytes=max_stream_reply_bytes)
    add_shard_servicer(servicer, server)
    bound = 0
    for candidate in span if not port else [port]:
        try:
            bound = tls.add_port(server, f"{host}:{candidate}", insecure, files)
        except RuntimeError:
            bound = 0
        if bound:
            break
    try:
        listener = FrameListener(servicer.serve_frames, host, [p for p in span if p != bound], insecure, files,
                                 max_conns=max_streams, max_message_bytes=max_message_bytes) if bound else None
    except OSError:
        listener = None
    if listener is None:
        server.stop(None)
        raise RuntimeError(f"cannot bind the expert server and its frame listener on {host} (port {port}, "
                           f"ELASTICMOE_EXPERT_PORT_RANGE={os.environ.get('ELASTICMOE_EXPERT_PORT_RANGE')})")
    servicer.frame_port, servicer.frame_unix_path = listener.port, listener.unix_path
    server.start()
    log.info("expert shard %s serving on %s:%d, frames on %d (%s)", shard_id, host, bound, listener.port,
             "plaintext" if insecure else "mTLS")
    return ShardServer(server, listener, servicer), servicer, bound
