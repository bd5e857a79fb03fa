"""channel_options' keepalive against a peer that stops answering (its host gone: no FIN, no reset), over a real
gRPC channel and a raw HTTP/2 peer that answers SETTINGS but never a PING: the call in flight fails UNAVAILABLE
within keepalive_s + keepalive_timeout_s, as the gateway's failover expects of a dead shard."""

from __future__ import annotations

import socket
import threading
import time

import grpc

from elasticmoe.rpc.options import channel_options

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
PREFACE_LEN = 24  # the client's "PRI * HTTP/2.0..." line


def _deaf_peer(server: socket.socket, stop: threading.Event) -> None:
    """Accept one connection, take part in HTTP/2's opening, then read and drop everything: no PING is answered."""
    conn, _ = server.accept()
    with conn:
        conn.sendall(SETTINGS)
        conn.settimeout(0.2)
        seen, acked = 0, False
        while not stop.is_set():
            try:
                data = conn.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                return
            seen += len(data)
            if not acked and seen > PREFACE_LEN:  # its SETTINGS came with the preface
                conn.sendall(SETTINGS_ACK)
                acked = True


def test_a_call_to_a_peer_that_stops_answering_pings_fails_within_the_keepalive_timeout():
    """gRPC 1.85 waits for a ping's answer grpc.http2.ping_timeout_ms (60 s by default), not keepalive_timeout_ms:
    the call waited 61 s (here, its 20 s deadline) where channel_options promised keepalive_s + keepalive_timeout_s."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    peer = threading.Thread(target=_deaf_peer, args=(server, stop), daemon=True)
    peer.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.getsockname()[1]}",
                                    options=channel_options(keepalive_s=1.0, keepalive_timeout_s=1.0))
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
        t0 = time.monotonic()
        call = channel.unary_unary("/elasticmoe.v1.ExpertShard/Health").future(b"", timeout=20)
        e = call.exception(timeout=30)
        assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert time.monotonic() - t0 < 6, time.monotonic() - t0
    finally:
        channel.close()
        stop.set()
        server.close()
        peer.join(5)
