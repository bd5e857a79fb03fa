"""gRPC channel and server options and malloc tuning: torch-free, so the controller and clients stay light."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MiB = 1 << 20


def _message_bytes(name: str = "ELASTICMOE_GRPC_MAX_MESSAGE_BYTES", default: int = 256 * MiB) -> int:
    """$name as a positive whole number of bytes (default when unset); any other value is refused, naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # '²'.isdigit(), and int() refuses it
        raise ValueError(f"{name}={raw!r}: expected a positive number of bytes")
    return int(raw)


# Default cap of one gRPC message both ways; a [T, H] bf16 batch is 2*T*H bytes (T=8192, H=7168: 112 MiB).
MAX_MESSAGE_BYTES = _message_bytes()
# A shard's answers on one RunExpertsStream that gRPC has not sent on yet (a gateway slow to read): their bytes at
# most, besides their count (experts.server); one answer alone always goes. 16 streams: 1 GiB (or one answer each).
STREAM_REPLY_BYTES = _message_bytes("ELASTICMOE_STREAM_REPLY_BYTES", 64 * MiB)


# Serve's gRPC proxy's message limit (Ray reads it in each proxy; every place that starts Ray sets it for every Ray
# process), and so the largest Generate answer the gateway sends (gRPC clients' default receive limit too)
PROXY_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
PROXY_MESSAGE_BYTES = 4 * MiB


def answer_bytes() -> int:
    """The most bytes one Generate answer may take: $RAY_SERVE_GRPC_MAX_MESSAGE_SIZE as this process has it (a
    gateway replica, from its Ray node, as Serve's proxy has it), else 4 MiB; ValueError naming it unless a positive
    byte count. A larger answer was sent to the proxy, which failed the call "Sent message larger than max"."""
    return _message_bytes(PROXY_MESSAGE_ENV, PROXY_MESSAGE_BYTES)


# HTTP/2 and TCP settings for MiB-sized messages (both sides); ELASTICMOE_GRPC_HTTP2_TUNING=0 keeps grpc's defaults.
HTTP2_TUNING = os.environ.get("ELASTICMOE_GRPC_HTTP2_TUNING", "1") != "0"
HTTP2_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.max_frame_size", 16 * MiB - 1),  # the largest HTTP/2 DATA frame we accept (default 16 KiB)
    ("grpc.http2.lookahead_bytes", 16 * MiB),  # a stream's initial receive window (default 64 KiB)
    ("grpc.http2.bdp_probe", 1),  # grow the windows with the bandwidth-delay product
    ("grpc.experimental.tcp_read_chunk_size", 1 * MiB),  # read MiB at a time (default 8 KiB)
    ("grpc.experimental.tcp_min_read_chunk_size", 256 << 10),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 * MiB),
]


def _http2(on: bool | None = None) -> list[tuple[str, int]]:
    return list(HTTP2_OPTIONS) if (HTTP2_TUNING if on is None else on) else []


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, keepalive_s: float | None = 30.0,
                    keepalive_timeout_s: float = 10.0, http2: bool | None = None) -> list[tuple[str, int]]:
    """Options for grpc(.aio) channels: raised message limits both ways and keepalive pings.

    Keepalive pings (also while idle) detect a dead shard within keepalive_s + keepalive_timeout_s
    even when no call is in flight (gRPC 1.85 waits for a ping's answer grpc.http2.ping_timeout_ms, 60 s by
    default, whatever grpc.keepalive_timeout_ms says: both are set); servers must allow them (server_options does).
    keepalive_s=None: no pings, for servers we do not configure (Serve's gRPC proxy answers 30 s pings with GOAWAY
    too_many_pings).
    http2: HTTP2_OPTIONS on or off (None: HTTP2_TUNING).
    """
    limits = [("grpc.max_send_message_length", max_message_bytes),
              ("grpc.max_receive_message_length", max_message_bytes), *_http2(http2)]
    if keepalive_s is None:
        return limits
    return limits + [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # unlimited pings without data
    ]


# A shard's gRPC port: a connection that has not finished its (m)TLS handshake by then is closed (gRPC's default:
# 120 s), and at most this many connections at once (more are closed as they connect). Without them a local client
# opening TCP connections and never speaking held a descriptor each for 2 min, without bound: the shard ran out
# (EMFILE), and with it its frame listener, its checkpoint reads.
SERVER_HANDSHAKE_S = 10.0
SERVER_MAX_CONNECTIONS = 512


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES, min_ping_interval_s: float = 10.0
                   ) -> list[tuple[str, int]]:
    """Options for grpc(.aio) servers: raised message limits; accept client pings every min_ping_interval_s; a port
    of their own (gRPC's default SO_REUSEPORT let a second server of this user bind a port another one serves, and
    the kernel then split the connections to it between both); SERVER_HANDSHAKE_S and SERVER_MAX_CONNECTIONS.

    The default server policy (one ping per 5 min without data) would answer channel_options'
    30 s keepalive with GOAWAY "too_many_pings".
    """
    interval_ms = int(min_ping_interval_s * 1000)
    return [
        ("grpc.server_handshake_timeout_ms", int(SERVER_HANDSHAKE_S * 1000)),
        ("grpc.max_allowed_incoming_connections", SERVER_MAX_CONNECTIONS),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", interval_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", interval_ms),
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging too often
        ("grpc.so_reuseport", 0),  # a port in use is refused (the next of ELASTICMOE_EXPERT_PORT_RANGE is tried)
        *_http2(),
    ]


GRPC_OPTIONS: list[tuple[str, int]] = channel_options()
GRPC_SERVER_OPTIONS: list[tuple[str, int]] = server_options()


# glibc malloc settings for processes that move MiB-sized messages (gateway, shards), as env vars for a
# process about to start (e.g. a Ray runtime_env's env_vars). See tune_malloc.
MALLOC_ENV: dict[str, str] = {"MALLOC_TRIM_THRESHOLD_": str(256 * MiB), "MALLOC_MMAP_THRESHOLD_": str(32 * MiB)}


def tune_malloc(trim_threshold: int = 256 * MiB, mmap_threshold: int = 32 * MiB) -> bool:
    """Stops glibc malloc from returning freed heap to the OS after every MiB-sized message.

    By default glibc serves each >=1 MiB buffer (protobuf arena, bytes, gRPC slices) from fresh
    mmap/brk pages and trims them on free, so every call page-faults its payload in again: measured
    p50 8.3 -> 2.4 ms for a 1 MiB RunExperts round trip, client and server tuned (2-vCPU VM,
    `benchmarks/rpc_fanout.py`). Process-wide; call once at process start.
    Returns False (and changes nothing) where glibc's mallopt is unavailable. mmap_threshold <= 32 MiB.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_trim_threshold, trim_threshold)) and bool(mallopt(m_mmap_threshold, mmap_threshold))
