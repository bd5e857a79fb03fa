"""A shard's gRPC port against local clients that open TCP and never speak, over real sockets and a real mTLS shard:
each is closed after SERVER_HANDSHAKE_S, at most SERVER_MAX_CONNECTIONS are held at once, and a gateway's calls are
answered once they are gone."""

from __future__ import annotations

import socket
import time

import grpc

from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.rpc import options
from tests.net_util import closed_within
from tests.shard_util import E, Shards, _req, files  # noqa: F401


def _call(shards: Shards, files) -> grpc.RpcError | None:  # noqa: F811
    """One RunExperts through a new channel: None when answered, else its error."""
    t = UnaryTransport()
    try:
        t.send(shards.addresses[0], lambda: _req(files, shards.layers[0]), 10).result(timeout=20)
        return None
    except grpc.RpcError as e:
        return e
    finally:
        t.close()


def test_connections_that_never_begin_tls_are_closed_and_capped(files, monkeypatch):  # noqa: F811
    """Two silent TCP connections fill a cap of 2: a gateway's call is not served (UNAVAILABLE) meanwhile; each is
    closed after SERVER_HANDSHAKE_S (gRPC's default kept them 120 s, uncapped), and the call is answered after."""
    monkeypatch.setattr(options, "SERVER_HANDSHAKE_S", 2.0)
    monkeypatch.setattr(options, "SERVER_MAX_CONNECTIONS", 2)
    shards = Shards(files, [list(range(E))])
    port = int(shards.addresses[0].rsplit(":", 1)[1])
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted
        e = _call(shards, files)
        assert e is not None and e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert all(closed_within(s, 6) for s in silent)
        assert _call(shards, files) is None
    finally:
        for s in silent:
            s.close()
        shards.close()

