"""A shard's frame listener spoken to over raw sockets: unreadable frames fail alone (their frame id answered when
it can be read) and a bad length prefix closes only its connection; mTLS only; connections beyond the limit are
refused (tests/test_socket_transport.py: the transport over it)."""

from __future__ import annotations

import socket
import ssl
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frame_socket, frames, tls, unix_socket
from tests.shard_util import E, _inputs, _req, answer_within, files, halves  # noqa: F401


def _connect(servicer, ctx: ssl.SSLContext | None = None) -> socket.socket:
    """A raw connection to a shard's frame listener: mTLS with `ctx`, else plaintext."""
    s = socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=10)
    return ctx.wrap_socket(s, server_hostname=tls.SERVER_NAME) if ctx else s


def _replies(s: socket.socket, n: int) -> list[frames.Reply]:
    got = frame_socket.FrameReader(s).frames()
    return [frames.decode_reply(next(got)) for _ in range(n)]


def test_unreadable_frames_fail_alone_and_a_bad_prefix_closes_only_its_connection(files, halves):  # noqa: F811
    layer = halves.layers[0]
    hidden, ids, weights = _inputs(files)
    good = frames.encode_request(1, layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32), weights[:4])
    bad_magic, bad_dtype = bytearray(good), bytearray(good)
    bad_magic[8:12] = b"XXXX"
    bad_dtype[8 + frames.HEADER.size] = 99
    other = SocketTransport()
    with _connect(halves.servicers[0], tls.client_ssl_context()) as s:
        s.sendall(bytes(bad_magic) + bytes(bad_dtype) + good)
        replies = sorted(_replies(s, 3), key=lambda r: (r.id, r.code == 0))
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [(r.id, r.code) for r in replies] == [(1, invalid), (1, invalid), (1, 0)], replies
        replies.sort(key=lambda r: "magic" not in r.error)
        assert "magic" in replies[0].error and "dtype code 99" in replies[1].error
        assert other.send(halves.addresses[0], lambda: _req(files, layer), 5).result(timeout=10).output.data
        s.sendall(b"\x00" * 8 + good)  # not a length prefix: the shard cannot resynchronise, it ends this connection
        assert next(frame_socket.FrameReader(s).frames(), None) is None  # the connection ended
    try:  # the shard and the other connection go on
        assert other.send(halves.addresses[0], lambda: _req(files, layer, seed=1), 5).result(timeout=10).output.data
    finally:
        other.close()


def test_a_bad_magic_or_kind_is_answered_under_its_frame_id(files, halves):  # noqa: F811
    """A frame whose header is readable but whose magic or kind is wrong gets INVALID_ARGUMENT under its own id (its
    call ends at once, not at its deadline); one too short for a header is answered as frame 0."""
    layer = halves.layers[0]
    hidden, ids, weights = _inputs(files)
    bad_magic = bytearray(frames.encode_request(7, layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32),
                                                weights[:4]))
    bad_magic[8:12] = b"XXXX"
    a_reply = frames.encode_reply(8, torch.ones(1, 1))  # kind 2 where a request (kind 1) belongs
    short = frames._varint5(16) + b"\0" * 16  # its framing intact, no header to read an id from
    with _connect(halves.servicers[0], tls.client_ssl_context()) as s:
        s.sendall(bytes(bad_magic) + a_reply + short)
        replies = sorted(_replies(s, 3), key=lambda r: r.id)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [(r.id, r.code) for r in replies] == [(0, invalid), (7, invalid), (8, invalid)], replies
    assert "header" in replies[0].error and "magic b'XXXX'" in replies[1].error and "kind 2" in replies[2].error


def _refused(servicer, ctx: ssl.SSLContext | None, good: bytes) -> None:
    """The listener answers nothing: the handshake, the write or the read fails, or the connection just ends."""
    try:
        with _connect(servicer, ctx) as s:
            s.sendall(good)
            assert next(frame_socket.FrameReader(s).frames(), None) is None  # the connection ended
    except (ssl.SSLError, ConnectionError):
        pass


def test_listener_speaks_mtls_only(files, halves, tmp_path):  # noqa: F811
    layer, servicer = halves.layers[0], halves.servicers[0]
    hidden, ids, weights = _inputs(files)
    good = frames.encode_request(7, layer, hidden[:2], (ids[:2] % (E // 2)).to(torch.int32), weights[:2])
    calls = servicer.calls
    with _connect(servicer, tls.client_ssl_context()) as s:  # a certificate of the release's CA
        s.sendall(good)
        assert _replies(s, 1)[0].code == 0 and servicer.calls == calls + 1
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(cafile=tls.tls_files().ca)
    other = tls.local_ca(tmp_path / "other")  # another CA's certificate, trusting ours
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.load_verify_locations(cafile=tls.tls_files().ca)
    foreign.load_cert_chain(other.cert, other.key)
    for ctx in (None, no_cert, foreign):  # plaintext, no client certificate, a certificate of another CA
        _refused(servicer, ctx, good)
    assert servicer.calls == calls + 1  # none of them ran a frame


def test_connections_beyond_the_limit_are_refused(files):  # noqa: F811
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "s", max_workers=2, max_streams=1)
    address, first, second = f"127.0.0.1:{port}", SocketTransport(), SocketTransport()
    try:
        assert first.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        with pytest.raises(grpc.RpcError) as e:
            second.send(address, lambda: _req(files, layer), 5).result(timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.close()  # its connection ends: the place is free again
        assert answer_within(second, address, lambda: _req(files, layer)).output.data
    finally:
        first.close()
        second.close()
        server.stop(None)


def _unary(files, address: str, layer: int, patience_s: float):  # noqa: F811
    """One RunExperts over gRPC, asked again while the shard answers 'shard busy', for up to patience_s."""
    t, deadline = UnaryTransport(), time.monotonic() + patience_s
    try:
        while True:
            try:
                return t.send(address, lambda: _req(files, layer), 5).result(timeout=10)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        t.close()


def _small_window(servicer) -> tuple[socket.socket, int]:
    """A plain connection to the frame listener with a 4 KiB receive window, and the rows of a request whose float64
    reply [rows, H] (16 MiB) is more than both socket buffers hold."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    raw.connect(("127.0.0.1", servicer.frame_port))
    return raw, 1 << 15


def _sent_until_computed(s, files, store, layer: int, rows: int) -> None:  # noqa: F811
    """Send one request of `rows` tokens on s; return once the shard has computed it (its reply is being written)."""
    hidden = torch.randn(rows, files.spec.hidden_size)
    ids, weights = torch.randint(0, E, (rows, 2), dtype=torch.int32), torch.rand(rows, 2)
    s.sendall(frames.encode_request(1, layer, hidden, ids, weights))
    deadline = time.monotonic() + 60
    while not store.stats().calls:  # computed (counted just before the reply is written)
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_reply_its_reader_is_slow_to_take_holds_no_run_slot(files):  # noqa: F811
    """A frame's reply is written once it is computed: a gateway slow to read it (here: not reading a 16 MiB reply)
    must not keep a RunExperts worker (run slot) for as long as the write blocks (up to SEND_TIMEOUT_S), refusing
    other gateways' calls as 'shard busy' while the shard computes nothing."""
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, servicer, port = start_server(store, "slow", max_workers=1)
    raw, rows = _small_window(servicer)
    try:
        with tls.client_ssl_context().wrap_socket(raw, server_hostname=tls.SERVER_NAME) as s:
            _sent_until_computed(s, files, store, layer, rows)
            reply = _unary(files, f"127.0.0.1:{port}", layer, patience_s=3.0)
            assert reply.output.data and not reply.missing
            (slow,) = _replies(s, 1)  # the slow reader's reply, whole
            assert slow.code == 0 and tuple(slow.output.shape) == (rows, files.spec.hidden_size)
    finally:
        raw.close()
        server.stop(None).wait(10)


@pytest.mark.parametrize("lingering", [None, 0], ids=["lingering", "closed_at_once"])
def test_a_refused_connection_reads_as_busy_though_its_frames_were_sent_after_the_refusal(
        files, lingering, monkeypatch):  # noqa: F811
    """A connection over the limit is refused 'shard busy' (the shard is alive: the gateway asks again shortly). The
    gateway writes the frames submitted while it connected just after its handshake, and the listener may have
    refused it by then: those writes, and the reads after them, must not turn the refusal into UNAVAILABLE (a
    broken connection, reported to the controller as a dead shard). Over REFUSE_LINGERING refusals at once
    (`closed_at_once`) the listener closes at once: the gateway's writes fail (broken pipe) and its reads may reset,
    and the refusal already in its socket still decides."""
    from elasticmoe.gateway import socket_conn
    from elasticmoe.gateway.transport import is_busy
    from elasticmoe.rpc import frame_gate

    if lingering is not None:
        monkeypatch.setattr(frame_gate, "REFUSE_LINGERING", lingering)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "s", max_workers=2, max_streams=1)
    address, first, second = f"127.0.0.1:{port}", SocketTransport(), SocketTransport()
    stub, _ = second.stub(address)

    def late_open():  # open, then let the listener refuse and close before the frames go out
        sock, limit = second._open(address, stub)
        time.sleep(0.3)
        return sock, limit
    try:
        assert first.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        for _ in range(3):
            conn = socket_conn._Conn(address, late_open)
            calls = [cf.Future() for _ in range(3)]
            for i, fut in enumerate(calls):
                fut.set_running_or_notify_cancel()
                assert conn.submit(i + 1, frames.request_parts(i + 1, _req(files, layer, seed=i)), fut)
            for fut in calls:
                e = fut.exception(timeout=10)
                assert is_busy(e), e
            assert is_busy(conn.error), conn.error
    finally:
        first.close()
        second.close()
        server.stop(None).wait(10)


@pytest.mark.parametrize("insecure", [False, True], ids=["mtls", "plaintext"])
def test_a_gateway_that_stops_reading_loses_its_connection_after_the_send_timeout(
        files, monkeypatch, insecure):  # noqa: F811
    """A reply the gateway does not read (a 16 MiB reply, a 4 KiB window): the write moves nothing for
    SEND_TIMEOUT_S, then the connection ends, its thread returns and its place is free; over mTLS too, where a
    blocking SSL write retried its wait for room for ever (the thread and one of max_conns places held)."""
    monkeypatch.setattr(frame_socket, "SEND_TIMEOUT_S", 1)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, servicer, port = start_server(store, "stuck", insecure=insecure)
    listener = server.listener
    raw, rows = _small_window(servicer)
    try:
        s = raw if insecure else tls.client_ssl_context().wrap_socket(raw, server_hostname=tls.SERVER_NAME)
        _sent_until_computed(s, files, store, layer, rows)
        deadline = time.monotonic() + 8
        while (listener._conns or listener._threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listener._conns and not listener._threads
    finally:
        raw.close()
        server.stop(None).wait(10)


def test_both_ends_of_a_frame_connection_probe_a_silent_peer_within_a_minute(files, monkeypatch):  # noqa: F811
    """A peer whose host vanished without closing (power, a cut link) sends nothing, not even a reset: only TCP
    keepalive finds it. Both ends' sockets (mTLS, as deployed) probe after 30 s of silence, every 10 s, 3 times: the
    shard's place and the gateway's pending calls are freed within a minute, not Linux's default 2 h 11 min. (TCP:
    a shard on another host; on this one the Unix socket's peer cannot vanish without the kernel closing it.)"""
    monkeypatch.setenv(unix_socket.ENV, "0")
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "s")
    t = SocketTransport()
    try:
        assert t.send(f"127.0.0.1:{port}", lambda: _req(files, layer), 5).result(timeout=10).output.data
        [gateway_end] = [c.sock.sock for c in t._conns.values()]  # SerialTLS over the SSLSocket
        [shard_end] = list(server.listener._conns)
        for end in (gateway_end, shard_end):
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            probes = [end.getsockopt(socket.IPPROTO_TCP, o) for o in
                      (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)]
            assert probes == [30, 10, 3] and probes[0] + probes[1] * probes[2] <= 60, probes
    finally:
        t.close()
        server.stop(None)


def test_a_flood_of_connections_over_the_limit_holds_a_bounded_number_of_threads(files, monkeypatch):  # noqa: F811
    """Each refused connection lingers (reading what its client sends) for up to REFUSE_LINGER_S on a thread of its
    own: at most REFUSE_LINGERING of them at once, the others are answered busy and closed at once, so that a flood
    of connections over the limit cannot make threads without bound; a normal connection is served afterwards.
    A refusal closed at once ends its thread just after its answer is read (on a loaded machine, not before the
    count: CI once counted 12 of a bound of 11), so the count is awaited, with the lingering ones held for 30 s:
    uncapped, every one of the 48 would still be there."""
    from elasticmoe.rpc import frame_gate

    monkeypatch.setattr(frame_gate, "REFUSE_LINGER_S", 30.0)

    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, servicer, port = start_server(store, "s", max_workers=2, max_streams=1, insecure=True)
    address, t = f"127.0.0.1:{port}", SocketTransport(insecure=True)
    holder = socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=10)  # takes the only place
    flood: list[socket.socket] = []
    try:
        time.sleep(0.2)
        for _ in range(48):  # they send nothing and never close: each refusal would linger its full time
            flood.append(socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=10))
        for s in flood:  # every one is refused 'shard busy' (id 0)
            (busy,) = _replies(s, 1)
            assert busy.id == 0 and frames.BUSY in busy.error
        bound, deadline = 1 + frame_gate.REFUSE_LINGERING + 2, time.monotonic() + 5
        while len(server.listener._threads) > bound and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.listener._threads) <= bound, len(server.listener._threads)
        for s in flood:
            s.close()
        holder.close()
        assert answer_within(t, address, lambda: _req(files, layer)).output.data
    finally:
        for s in flood + [holder]:
            s.close()
        t.close()
        server.stop(None).wait(10)
