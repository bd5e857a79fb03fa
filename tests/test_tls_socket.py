"""SerialTLS over a real mTLS pair: a writer waiting for room never stops the reader, a stuck write times out."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from elasticmoe.rpc import tls
from elasticmoe.rpc.tls_socket import SerialTLS

BLOB = 8 << 20  # far more than both sockets' buffers: each side's write waits for the other to read


@pytest.fixture
def pair(tmp_path):
    """(client SerialTLS, server SSLSocket, blocking) after a real handshake with a CA made in tmp_path."""
    files = tls.local_ca(tmp_path / "ca")
    a, b = socket.socketpair()
    out: dict = {}
    server = threading.Thread(target=lambda: out.update(s=tls.server_ssl_context(files).wrap_socket(
        b, server_side=True)))
    server.start()
    client = tls.client_ssl_context(files).wrap_socket(a, server_hostname=tls.SERVER_NAME)
    server.join(10)
    yield SerialTLS(client, send_timeout_s=0.5), out["s"]
    client.close()
    out["s"].close()


def _read_exactly(recv_into, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = recv_into(view[got:])
        assert k, "end of stream before the whole blob"
        got += k
    return bytes(buf)


def test_both_ends_writing_at_once_neither_stalls(pair):
    """The peer first writes BLOB, then reads ours. Our writer starts at the same time, so it must wait for room
    while our reader drains the peer's BLOB: with the SSL object held across that wait, both would stall."""
    ours, peer = pair
    mine, theirs = os.urandom(BLOB), os.urandom(BLOB)
    got: dict = {}

    def peer_side() -> None:
        peer.sendall(theirs)
        got["peer"] = _read_exactly(peer.recv_into, BLOB)

    threads = [threading.Thread(target=peer_side, daemon=True),
               threading.Thread(target=lambda: ours.sendall(mine), daemon=True),
               threading.Thread(target=lambda: got.update(ours=_read_exactly(ours.recv_into, BLOB)), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got.get("ours") == theirs and got.get("peer") == mine


def test_a_write_the_peer_never_reads_times_out(pair):
    ours, _peer = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="moved nothing"):
        ours.sendall(bytes(64 << 20))
    assert time.monotonic() - t0 < 10


def test_reader_wakes_at_end_of_stream(pair):
    ours, peer = pair
    peer.sendall(b"last words")
    assert _read_exactly(ours.recv_into, 10) == b"last words"
    socket.socket.shutdown(peer, socket.SHUT_RDWR)
    done: list = []
    t = threading.Thread(target=lambda: done.append(ours.recv_into(memoryview(bytearray(16)))), daemon=True)
    t.start()
    t.join(5)
    assert done == [0]
