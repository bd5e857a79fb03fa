"""The socket transport (frames on one TCP/mTLS connection per shard, to the shard's frame listener) over real
in-process shards: answers equal the stream transport's bit for bit; mTLS only; a dead shard or a dropped connection
fails pending calls at once and the next send reconnects; deadlines; graceful stop; unreadable frames and bad length
prefixes; the stream's limits and error codes."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.config import Limits
from elasticmoe.experts.server import start_server
from elasticmoe.gateway import socket_transport
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import TransportError, make_transport
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frame_socket, frames, tls
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from elasticmoe.rpc.tls_socket import SerialTLS
from tests.shard_util import E, Shards, _inputs, _reference, _run, files  # noqa: F401


@pytest.fixture
def pair(files):  # noqa: F811
    shards = Shards(files, [list(range(E // 2)), list(range(E // 2, E))])
    yield shards
    shards.close()


def _req(files, layer: int, rows: int = 4, seed: int = 0) -> ExpertRequest:  # noqa: F811
    """rows tokens routed to experts [0, E/2) (what pair's shard 0 holds)."""
    hidden, ids, weights = _inputs(files, seed)
    return ExpertRequest(layer, hidden[:rows], (ids[:rows] % (E // 2)).to(torch.int32), weights[:rows], 3)


def test_config_selects_the_socket_transport():
    assert Limits(transport="socket").transport == "socket" and Limits().transport == "socket"
    t = make_transport("socket", insecure=False)
    assert isinstance(t, SocketTransport)
    t.close()


def test_socket_bytes_are_the_streams_frames(files):  # noqa: F811
    """What sendmsg writes is request_frame's bytes; the ExpertFrame prefix is the length prefix; anything else as a
    prefix is refused."""
    req = _req(files, 1, rows=3)
    wire = frames.request_frame(5, req)
    assert b"".join(bytes(p) for p in frames.request_parts(5, req)) == wire
    assert frames.frame_size(wire[:frame_socket.PREFIX]) == len(wire) - frame_socket.PREFIX
    out = torch.randn(3, 8).to(torch.bfloat16)
    parts = frames.reply_parts(5, out, [2, 7], 11, 4)
    assert b"".join(bytes(p) for p in parts) == frames.encode_reply(5, out, [2, 7], 11, 4)
    for bad in (b"\x00" * 8, wire[:3] + b"\x00" * 5, b"\x0a" + wire[1:8]):
        with pytest.raises(frames.FrameError, match="length prefix"):
            frames.frame_size(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_answers_equal_the_stream_bit_for_bit(files, pair, dtype):  # noqa: F811
    """The same requests to two shards (each half the experts) through both transports: the same float64 outputs
    bit for bit, the same missing experts, the same compute path."""
    layer = pair.layers[0]
    sock, stream = SocketTransport(), StreamTransport()
    try:
        for seed in range(3):
            for i, address in enumerate(pair.addresses):
                hidden, ids, weights = _inputs(files, seed)
                held = ids % (E // 2) + i * (E // 2) if seed < 2 else ids  # seed 2: some experts not held here
                req = ExpertRequest(layer, hidden.to(dtype), held.to(torch.int32), weights, placement_version=4)
                a = sock.send(address, lambda: req, 10).result(timeout=20)
                b = stream.send(address, lambda: req, 10).result(timeout=20)
                assert a.missing == b.missing and (seed == 2) == bool(a.missing), (a.missing, b.missing)
                if not a.missing:
                    out_a, out_b = decode_tensor(a.output), decode_tensor(b.output)
                    assert out_a.dtype == torch.float64 and torch.equal(out_a, out_b)
        assert sorted(sock._conns) == sorted(pair.addresses)  # one connection per shard, kept
    finally:
        sock.close()
        stream.close()


def test_frame_ids_match_answers_under_concurrency_on_mtls(files, pair):  # noqa: F811
    """8 threads, requests of different sizes in flight on one mTLS connection (one thread writing while the reader
    reads, their SSL calls one at a time: SerialTLS): each answer is its own request's."""
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()

    def one(i: int) -> None:
        rows = 1 + i % 24
        req = _req(files, layer, rows, seed=i)
        got = t.send(address, lambda: req, 10).result(timeout=20)
        want = _reference(files, layer, req.hidden, req.topk_ids.long(), req.topk_weights)
        torch.testing.assert_close(decode_tensor(got.output), want.double(), rtol=1e-5, atol=1e-6)

    try:
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(64)))
        assert list(t._conns) == [address] and not t._conns[address].pending
        sock = t._conns[address].sock
        assert isinstance(sock, SerialTLS) and isinstance(sock.sock, ssl.SSLSocket) and not sock.sock.getblocking()
    finally:
        t.close()


def test_dispatch_equals_single_process(files, pair):  # noqa: F811
    layer, inputs = pair.layers[0], _inputs(files)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport="socket", timeout_s=5)
    try:
        d.set_table(pair.table({e: [0] if e < E // 2 else [1] for e in range(E)}))
        for _ in range(3):
            out, _ = _run(d, layer, inputs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers == 0 and len(d.transport._conns) == 2
    finally:
        d.close()


def test_dead_shard_fails_pending_calls_at_once_and_the_next_send_reconnects(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        first = t._conns[address]
        pair.servicers[0].faults.run_delay_s = 5.0
        pending = [t.send(address, lambda: _req(files, layer, seed=i), 30) for i in range(3)]
        time.sleep(0.2)
        t0 = time.perf_counter()
        stopped = pair.servers[0].stop(None)  # the gRPC server and the frame listener with its connections
        for fut in pending:
            with pytest.raises(grpc.RpcError) as e:
                fut.result(timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - t0 < 2.0 and first.dead  # not the 30 s deadline, nor the 5 s delay
        assert stopped.wait(10)  # once the frame being computed ends; the two queued behind it are not run
        assert time.perf_counter() - t0 < 8.0
        port = int(address.rsplit(":", 1)[1])
        pair.servers[0], pair.servicers[0], _ = start_server(pair.stores[0], "s0", port=port)
        got = t.send(address, lambda: _req(files, layer), 5).result(timeout=10)  # Health again: the new frame port
        assert got.output.data and t._conns[address] is not first
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_dropped_connection_fails_pending_calls_and_the_next_send_reconnects(files, pair):  # noqa: F811
    """The connection alone breaks (the shard lives on): its pending calls fail at once, the next send opens a new
    connection to the same listener."""
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        first = t._conns[address]
        pair.servicers[0].faults.run_delay_s = 2.0
        pending = t.send(address, lambda: _req(files, layer, seed=1), 30)
        time.sleep(0.2)
        t0 = time.perf_counter()
        for conn in list(pair.servers[0].listener._conns):
            frame_socket.shutdown(conn)
        with pytest.raises(grpc.RpcError) as e:
            pending.result(timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.perf_counter() - t0 < 1.5
        pair.servicers[0].faults.run_delay_s = 0.0
        assert t.send(address, lambda: _req(files, layer, seed=2), 5).result(timeout=10).output.data
        assert first.dead and t._conns[address] is not first
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_shard_stopped_mid_step_fails_over(files):  # noqa: F811
    """Both shards hold every expert; s0's frames hang and its server stops: the step ends on s1 at once."""
    shards = Shards(files, [list(range(E)), list(range(E))])
    layer, inputs = shards.layers[0], _inputs(files, 1)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport="socket", timeout_s=30, hedge_min_s=10.0)  # reached by failing over, not a hedge
    try:
        d.set_table(shards.table({e: [0, 1] for e in range(E)}))
        _run(d, layer, inputs)  # both connections open
        shards.servicers[0].faults.run_delay_s = 5.0
        step = d.dispatch(layer, *inputs)
        time.sleep(0.2)
        t0 = time.perf_counter()
        shards.servers[0].stop(None)
        out = step.wait()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        took = time.perf_counter() - t0  # not the 30 s deadline nor the 5 s delay (3 s: 2 loaded cores in CI)
        assert d.failovers >= 1 and d.hedges == 0 and took < 3.0, (d.failovers, d.hedges, took)
    finally:
        shards.servicers[0].faults.run_delay_s = 0.0
        d.close()
        shards.close()


def test_graceful_stop_answers_the_frames_running(files, pair):  # noqa: F811
    """stop(grace), as the shard deployment's scale-in does: a frame already running is answered (as on a gRPC
    stream, the connection is served until `grace`), then the connection ends and the next send fails."""
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        pair.servicers[0].faults.run_delay_s = 0.5
        running = t.send(address, lambda: _req(files, layer, seed=1), 10)
        time.sleep(0.2)
        stopped = pair.servers[0].stop(1.0)
        assert running.result(timeout=5).output.data
        assert stopped.wait(5)
        with pytest.raises(grpc.RpcError) as e:
            t.send(address, lambda: _req(files, layer, seed=2), 5).result(timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_deadline_is_per_request_and_the_connection_survives(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()
    try:
        pair.servicers[0].faults.run_delay_s = 1.0
        with pytest.raises(grpc.RpcError) as e:
            t.send(address, lambda: _req(files, layer), 0.2).result(timeout=5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        pair.servicers[0].faults.run_delay_s = 0.0
        conn = t._conns[address]
        assert t.send(address, lambda: _req(files, layer, seed=1), 5).result(timeout=10).output.data
        time.sleep(1.0)  # the late answer arrives and is dropped
        assert t._conns[address] is conn and not conn.dead and not conn.pending
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_oversize_and_bad_requests_get_the_streams_codes(files):  # noqa: F811
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "small", max_rows=4)
    address, sock, stream = f"127.0.0.1:{port}", SocketTransport(), StreamTransport()
    try:
        for req in (_req(files, layer, rows=8), _req(files, 999)):  # 8 rows > max_rows; not an MoE layer
            errors = []
            for t in (sock, stream):
                with pytest.raises(grpc.RpcError) as e:
                    t.send(address, lambda: req, 5).result(timeout=10)
                errors.append((e.value.code(), e.value.details()))
            assert errors[0] == errors[1] and errors[0][0] == grpc.StatusCode.INVALID_ARGUMENT, errors
        assert sock.send(address, lambda: _req(files, layer, rows=4), 5).result(timeout=10).output.data
    finally:
        sock.close()
        stream.close()
        server.stop(None)


def _connect(servicer, ctx: ssl.SSLContext | None = None) -> socket.socket:
    """A raw connection to a shard's frame listener: mTLS with `ctx`, else plaintext."""
    s = socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=10)
    return ctx.wrap_socket(s, server_hostname=tls.SERVER_NAME) if ctx else s


def _replies(s: socket.socket, n: int) -> list[frames.Reply]:
    got = frame_socket.FrameReader(s).frames()
    return [frames.decode_reply(next(got)) for _ in range(n)]


def test_unreadable_frames_fail_alone_and_a_bad_prefix_closes_only_its_connection(files, pair):  # noqa: F811
    layer = pair.layers[0]
    hidden, ids, weights = _inputs(files)
    good = frames.encode_request(1, layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32), weights[:4])
    bad_magic, bad_dtype = bytearray(good), bytearray(good)
    bad_magic[8:12] = b"XXXX"
    bad_dtype[8 + frames.HEADER.size] = 99
    other = SocketTransport()
    with _connect(pair.servicers[0], tls.client_ssl_context()) as s:
        s.sendall(bytes(bad_magic) + bytes(bad_dtype) + good)
        replies = sorted(_replies(s, 3), key=lambda r: (r.id, r.code == 0))
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert [(r.id, r.code) for r in replies] == [(1, invalid), (1, invalid), (1, 0)], replies
        replies.sort(key=lambda r: "magic" not in r.error)
        assert "magic" in replies[0].error and "dtype code 99" in replies[1].error
        assert other.send(pair.addresses[0], lambda: _req(files, layer), 5).result(timeout=10).output.data
        s.sendall(b"\x00" * 8 + good)  # not a length prefix: the shard cannot resynchronise, it ends this connection
        assert next(frame_socket.FrameReader(s).frames(), None) is None  # the connection ended
    try:  # the shard and the other connection go on
        assert other.send(pair.addresses[0], lambda: _req(files, layer, seed=1), 5).result(timeout=10).output.data
    finally:
        other.close()


def test_a_bad_magic_or_kind_is_answered_under_its_frame_id(files, pair):  # noqa: F811
    """A frame whose header is readable but whose magic or kind is wrong gets INVALID_ARGUMENT under its own id (its
    call ends at once, not at its deadline); one too short for a header is answered as frame 0."""
    layer = pair.layers[0]
    hidden, ids, weights = _inputs(files)
    bad_magic = bytearray(frames.encode_request(7, layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32),
                                                weights[:4]))
    bad_magic[8:12] = b"XXXX"
    a_reply = frames.encode_reply(8, torch.ones(1, 1))  # kind 2 where a request (kind 1) belongs
    short = frames._varint5(16) + b"\0" * 16  # its framing intact, no header to read an id from
    with _connect(pair.servicers[0], tls.client_ssl_context()) as s:
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


def test_listener_speaks_mtls_only(files, pair, tmp_path):  # noqa: F811
    layer, servicer = pair.layers[0], pair.servicers[0]
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
        deadline = time.monotonic() + 5
        while True:
            try:
                assert second.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        first.close()
        second.close()
        server.stop(None)


def test_renewed_tls_files_reopen_connections_and_calls_in_flight_finish(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        old = t._conns[address]
        pair.servicers[0].faults.run_delay_s = 0.5
        in_flight = t.send(address, lambda: _req(files, layer, seed=1), 10)
        t.renewal.changed = lambda: True  # as tls.Renewal says after the files changed
        renewed = t.send(address, lambda: _req(files, layer, seed=2), 10)
        del t.renewal.changed
        assert in_flight.result(timeout=10).output.data and renewed.result(timeout=10).output.data
        assert old.retired and t._conns[address] is not old
        deadline = time.monotonic() + 5
        while not old.dead and time.monotonic() < deadline:  # answered, then closed
            time.sleep(0.01)
        assert old.dead and not old.pending
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_a_connection_retired_while_opening_ends_once_open(files, pair):  # noqa: F811
    """Retired (renewed TLS files) while still opening, with no call pending: once open it ends at once instead of
    holding one of the shard's connections (and a thread here) for ever."""
    address, listener = pair.addresses[0], pair.servers[0].listener
    t = SocketTransport()
    go = threading.Event()
    stub, _ = t.stub(address)
    conn = socket_transport._Conn(address, lambda: go.wait(5) and t._open(address, stub))
    try:
        conn.retire()
        go.set()
        deadline = time.monotonic() + 5
        while (not conn.dead or listener._conns) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.dead and not listener._conns
    finally:
        conn.fail(TransportError(grpc.StatusCode.CANCELLED, "test over"))
        t.close()
