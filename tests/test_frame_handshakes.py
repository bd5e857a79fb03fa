"""The frame listener's TLS handshakes, over real sockets: connections that open TCP and never finish TLS are bounded
(the oldest is cut for a new one), and a real client still gets through; a listener that ran out of descriptors
accepts again once some are free."""

from __future__ import annotations

import select
import socket
import ssl
import subprocess
import sys
import time

import pytest
import torch

from elasticmoe.rpc import frame_gate, frame_listener, frame_socket, frames, tls
from elasticmoe.rpc.frames import ExpertRequest
from tests.doc_util import REPO

_REQ = ExpertRequest(0, torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))


def _echo(requests, put) -> None:
    for r in requests:
        put(frames.reply_parts(r.id, r.hidden))


def _until(check, seconds: float = 10.0) -> bool:
    """Whether check() comes true within `seconds` (the listener's threads run on their own time)."""
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _cut(sock: socket.socket) -> bool:
    """Whether the listener has ended this connection (end of stream or reset), waiting up to 5 s for it."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_stuck_in_the_tls_handshake_are_bounded():
    listener = frame_listener.FrameListener(_echo, "127.0.0.1", [0], max_handshakes=3)
    raw: list[socket.socket] = []
    try:
        for _ in range(8):  # TCP only: no ClientHello ever comes
            raw.append(socket.create_connection(("127.0.0.1", listener.port)))
            assert _until(lambda: len(listener._opening) == min(3, len(raw))), len(listener._opening)
        assert all(_cut(s) for s in raw[:5])  # each new one cut the oldest: at most 3 wait at once
        assert _until(lambda: len(listener._threads) == 3), len(listener._threads)
        client = tls.client_ssl_context().wrap_socket(socket.create_connection(("127.0.0.1", listener.port)),
                                                      server_hostname=tls.SERVER_NAME)
        with client:  # a real client is served: its handshake cut the oldest stuck one (raw[5])
            frame_socket.send_parts(client, frames.request_parts(7, _REQ))
            (reply,) = frame_socket.FrameReader(client).step()
            assert frames.decode_reply(reply).id == 7
            assert _cut(raw[5]) and len(listener._opening) <= 2
    finally:
        for s in raw:
            s.close()
        listener.close().wait(10)


def _client_hello() -> bytes:
    """The bytes a real client sends first (its ClientHello), made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client_ssl_context().wrap_bio(incoming, outgoing, server_hostname=tls.SERVER_NAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_handshake_trickled_byte_by_byte_is_cut_at_its_deadline(monkeypatch):
    """HANDSHAKE_S bounds the whole handshake, not each read: a client sending its ClientHello a byte at a time, each
    well within HANDSHAKE_S of the last, held its place (a thread, a descriptor) for as long as it kept trickling."""
    monkeypatch.setattr(frame_gate, "HANDSHAKE_S", 1.0)
    listener = frame_listener.FrameListener(_echo, "127.0.0.1", [0])
    hello = _client_hello()
    sock = socket.create_connection(("127.0.0.1", listener.port))
    try:
        t0, cut_at = time.monotonic(), None
        for i in range(len(hello)):
            try:
                sock.send(hello[i:i + 1])
            except OSError:
                cut_at = time.monotonic()
                break
            if select.select([sock], [], [], 0.25)[0]:  # readable before the hello is whole: the end of stream
                cut_at = time.monotonic()
                break
            if time.monotonic() - t0 > 5:
                break
        assert cut_at is not None and cut_at - t0 < 3, "the trickled handshake was not cut"
        assert _cut(sock) and _until(lambda: not listener._opening and not listener._threads)
    finally:
        sock.close()
        listener.close().wait(10)


_OUT_OF_FDS = """
import os, resource, sys
from elasticmoe.rpc import frames
from elasticmoe.rpc.frame_listener import FrameListener

def echo(requests, put):
    for r in requests:
        put(frames.reply_parts(r.id, r.hidden))

listener = FrameListener(echo, "127.0.0.1", [0], insecure=True)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:  # every descriptor taken, as by connections piled up on another port of the shard
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(listener.port, flush=True)
sys.stdin.readline()  # a client has connected meanwhile: accept() failed, EMFILE
for fd in held:
    os.close(fd)
print("freed", flush=True)
sys.stdin.readline()
"""


def test_a_listener_out_of_descriptors_accepts_again_once_some_are_free():
    """accept() failing for want of a descriptor (EMFILE) ended the listener's accept thread as a close does: the
    shard accepted no frame connection ever again, though it went on serving gRPC. It tries again now, and serves
    the connections that waited in the backlog once descriptors are free. Another process: it spends all of its own."""
    child = subprocess.Popen([sys.executable, "-c", _OUT_OF_FDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        port = int(child.stdout.readline())
        waiting = socket.create_connection(("127.0.0.1", port), timeout=10)  # in the backlog: accept() fails
        time.sleep(0.5)
        child.stdin.write("free\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "freed"
        with waiting, socket.create_connection(("127.0.0.1", port), timeout=10) as later:
            for i, s in enumerate((waiting, later)):
                frame_socket.send_parts(s, frames.request_parts(i + 1, _REQ))
                (reply,) = frame_socket.FrameReader(s).step()
                assert frames.decode_reply(reply).id == i + 1
    finally:
        child.kill()
        child.wait(10)
