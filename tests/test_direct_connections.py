"""The direct_grpc port against misbehaving local clients, over raw sockets and real gRPC clients: connections left
idle, connections over the cap, TCP that never speaks HTTP/2 and a call whose client stops answering pings are all
closed, and a real client is served afterwards."""

from __future__ import annotations

import os
import socket
import struct
import time

import grpc
import pytest

from elasticmoe.client import GenerationClient
from elasticmoe.config import DirectGrpc
from elasticmoe.gateway import direct_ingress
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from tests.net_util import closed_within
from tests.openai_util import Core, model  # noqa: F401 - the module-scoped tiny model fixture

PROMPT = "The quick brown fox"
# HTTP/2's client preface and an empty SETTINGS frame: the connection has begun, no call on it
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _port(model, **kw) -> tuple[Core, DirectIngress]:  # noqa: F811
    """A port (no API keys) on 127.0.0.1, any port, over a core of its own; kw: DirectIngress's."""
    core = Core(*model, max_num_seqs=2, max_model_len=128)
    core.api_keys = ApiKeys()
    return core, DirectIngress(GenerationService(core), "127.0.0.1", 0, **{"max_rpcs": 16, **kw})


def _stop(core, port: DirectIngress) -> None:
    port.stop(0)
    core.runner.close()


def _raw(port: DirectIngress, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port.port), timeout=10)
    if first:
        s.sendall(first)
    return s


def _answers(port: DirectIngress, patience_s: float = 10.0) -> bool:
    """Whether a new client's call is answered within patience_s (asked again while refused at the connection)."""
    end = time.monotonic() + patience_s
    while True:
        client = GenerationClient(port.address, timeout_s=30)
        try:
            return len(client.generate(PROMPT, max_tokens=2, temperature=0.0).token_ids) == 2
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                raise
            time.sleep(0.2)
        finally:
            client.close()


def _header(name: str, value: str) -> bytes:  # HPACK: a literal field, new name, not indexed, no Huffman
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _call_without_request(method: str) -> bytes:
    """A HEADERS frame (stream 1, END_HEADERS) opening `method`; its request message never follows."""
    block = b"".join(_header(k, v) for k, v in [(":method", "POST"), (":scheme", "http"), (":path", method),
                                                (":authority", "localhost"), ("content-type", "application/grpc"),
                                                ("te", "trailers")])
    return struct.pack(">I", len(block))[1:] + bytes([1, 0x4]) + struct.pack(">I", 1) + block


def test_connections_left_idle_are_closed_and_a_client_reconnects(model):  # noqa: F811
    """Connections a client opened and left without a call were held for good (gRPC's default): a local client
    could pile them up; each is now closed after idle_s, and a real client's next call opens a new one."""
    core, port = _port(model, idle_s=1)
    idle = [_raw(port, PREFACE) for _ in range(4)]
    try:
        assert all(closed_within(s, 5) for s in idle)
        assert _answers(port)
    finally:
        for s in idle:
            s.close()
        _stop(core, port)


def test_connections_over_the_cap_are_closed_as_they_connect(model):  # noqa: F811
    """At most max_connections at once: two held, a third client is not served (UNAVAILABLE) until one goes."""
    core, port = _port(model, max_connections=2)
    held = [_raw(port, PREFACE) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted
        client = GenerationClient(port.address, timeout_s=10)
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_tokens=2, temperature=0.0)
        client.close()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert not closed_within(held[0], 0.5) and not closed_within(held[1], 0.1)  # those in stay in
        held.pop().close()
        assert _answers(port)
    finally:
        for s in held:
            s.close()
        _stop(core, port)


def test_a_connection_that_never_begins_http2_is_closed(model, monkeypatch):  # noqa: F811
    """TCP opened and nothing sent: gRPC's default kept it 120 s; it now goes after HANDSHAKE_S."""
    monkeypatch.setattr(direct_ingress, "HANDSHAKE_S", 1.0)
    core, port = _port(model)
    silent = _raw(port)
    try:
        assert closed_within(silent, 5)
        assert _answers(port)
    finally:
        silent.close()
        _stop(core, port)


def test_a_call_whose_client_stops_answering_pings_ends_and_frees_its_place(model, monkeypatch):  # noqa: F811
    """A client that opened a call and went silent (its host gone: no ping answered) held the connection and one of
    max_rpcs places for good (no keepalive); the server's ping now goes unanswered and ends both."""
    monkeypatch.setattr(direct_ingress, "KEEPALIVE_S", 1.0)
    monkeypatch.setattr(direct_ingress, "KEEPALIVE_TIMEOUT_S", 1.0)
    core, port = _port(model, max_rpcs=1)
    gone = _raw(port, PREFACE + _call_without_request("/elasticmoe.v1.Generation/GenerateStream"))
    try:
        assert closed_within(gone, 8)
        assert _answers(port)  # its place is free again
    finally:
        gone.close()
        _stop(core, port)


def test_direct_connection_settings_are_checked():
    assert DirectGrpc(port=9100).max_connections == 256 and DirectGrpc(port=9100).idle_s == 300
    for bad in ({"max_connections": 0}, {"idle_s": 0.5}, {"idle_s": 10**6}):
        with pytest.raises(ValueError):
            DirectGrpc(port=9100, **bad)
