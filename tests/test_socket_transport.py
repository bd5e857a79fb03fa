"""The socket transport (frames on one TCP/mTLS connection per shard, to the shard's frame listener) over real
in-process shards: answers equal the stream transport's bit for bit; mTLS only; a dead shard or a dropped connection
fails pending calls at once and the next send reconnects; deadlines; graceful stop; unreadable frames and bad length
prefixes; the stream's limits and error codes (the listener spoken to over raw sockets: test_frame_listener.py)."""

from __future__ import annotations

import ssl
import threading
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.config import Limits
from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway import socket_transport
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import TransportError, make_transport
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from elasticmoe.rpc.tls_socket import SerialTLS
from tests.shard_util import E, Shards, _inputs, _reference, _req, _run, answer_within, files, halves  # noqa: F401


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
def test_answers_equal_the_stream_bit_for_bit(files, halves, dtype):  # noqa: F811
    """The same requests to two shards (each half the experts) through both transports: the same float64 outputs
    bit for bit, the same missing experts, the same compute path."""
    layer = halves.layers[0]
    sock, stream = SocketTransport(), StreamTransport()
    try:
        for seed in range(3):
            for i, address in enumerate(halves.addresses):
                hidden, ids, weights = _inputs(files, seed)
                held = ids % (E // 2) + i * (E // 2) if seed < 2 else ids  # seed 2: some experts not held here
                req = ExpertRequest(layer, hidden.to(dtype), held.to(torch.int32), weights, placement_version=4)
                a = sock.send(address, lambda: req, 10).result(timeout=20)
                b = stream.send(address, lambda: req, 10).result(timeout=20)
                assert a.missing == b.missing and (seed == 2) == bool(a.missing), (a.missing, b.missing)
                if not a.missing:
                    out_a, out_b = decode_tensor(a.output), decode_tensor(b.output)
                    assert out_a.dtype == torch.float64 and torch.equal(out_a, out_b)
        assert sorted(sock._conns) == sorted(halves.addresses)  # one connection per shard, kept
    finally:
        sock.close()
        stream.close()


def test_frame_ids_match_answers_under_concurrency_on_mtls(files, halves):  # noqa: F811
    """8 threads, requests of different sizes in flight on one mTLS connection (one thread writing while the reader
    reads, their SSL calls one at a time: SerialTLS): each answer is its own request's."""
    layer, address = halves.layers[0], halves.addresses[0]
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


def test_dispatch_equals_single_process(files, halves):  # noqa: F811
    layer, inputs = halves.layers[0], _inputs(files)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport="socket", timeout_s=5)
    try:
        d.set_table(halves.table({e: [0] if e < E // 2 else [1] for e in range(E)}))
        for _ in range(3):
            out, _ = _run(d, layer, inputs)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers == 0 and len(d.transport._conns) == 2
    finally:
        d.close()


def test_dead_shard_fails_pending_calls_at_once_and_the_next_send_reconnects(files, halves):  # noqa: F811
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        first = t._conns[address]
        halves.servicers[0].faults.run_delay_s = 5.0
        pending = [t.send(address, lambda: _req(files, layer, seed=i), 30) for i in range(3)]
        time.sleep(0.2)
        t0 = time.perf_counter()
        stopped = halves.servers[0].stop(None)  # the gRPC server and the frame listener with its connections
        for fut in pending:
            with pytest.raises(grpc.RpcError) as e:
                fut.result(timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - t0 < 2.0 and first.dead  # not the 30 s deadline, nor the 5 s delay
        assert stopped.wait(10)  # once the frame being computed ends; the two queued behind it are not run
        assert time.perf_counter() - t0 < 8.0
        port = int(address.rsplit(":", 1)[1])
        halves.servers[0], halves.servicers[0], _ = start_server(halves.stores[0], "s0", port=port)
        got = t.send(address, lambda: _req(files, layer), 5).result(timeout=10)  # Health again: the new frame port
        assert got.output.data and t._conns[address] is not first
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_a_shard_restarted_on_its_address_after_a_while_down_is_reached_at_once(files, halves):  # noqa: F811
    """A shard down for a while (its calls failing 'cannot connect') and started again on the same address (as a
    port range gives it): the next calls reach it within about a second, not after the gRPC channel's reconnect
    backoff, which had grown meanwhile (1 s, 1.6 s, 2.6 s, ... up to 120 s: the live shard reported dead). Down
    30 s, that backoff's next try is 10-16 s away; the 6 s bound leaves a loaded CI host room for the call."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        assert halves.servers[0].stop(None).wait(10)
        down = time.monotonic() + 30
        while time.monotonic() < down:  # a gateway's calls meanwhile (each fails over elsewhere)
            with pytest.raises(grpc.RpcError):
                t.send(address, lambda: _req(files, layer), 5).result(timeout=10)
            time.sleep(0.2)
        port = int(address.rsplit(":", 1)[1])
        halves.servers[0], halves.servicers[0], _ = start_server(halves.stores[0], "s0", port=port)
        t0 = time.monotonic()
        assert answer_within(t, address, lambda: _req(files, layer), seconds=30).output.data
        assert time.monotonic() - t0 < 6.0
    finally:
        t.close()


def test_dropped_connection_fails_pending_calls_and_the_next_send_reconnects(files, halves):  # noqa: F811
    """The connection alone breaks (the shard lives on): its pending calls fail at once, the next send opens a new
    connection to the same listener (at once: within 10 s, not at the call's 30 s deadline)."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        first = t._conns[address]
        halves.servicers[0].faults.run_delay_s = 2.0
        pending = t.send(address, lambda: _req(files, layer, seed=1), 30)
        time.sleep(0.2)
        t0 = time.perf_counter()
        for conn in list(halves.servers[0].listener._conns):
            frame_socket.shutdown(conn)
        with pytest.raises(grpc.RpcError) as e:
            pending.result(timeout=15)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.perf_counter() - t0 < 10.0
        halves.servicers[0].faults.run_delay_s = 0.0
        assert t.send(address, lambda: _req(files, layer, seed=2), 5).result(timeout=10).output.data
        assert first.dead and t._conns[address] is not first
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
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
        shards.servicers[0].faults.run_delay_s = 20.0
        step = d.dispatch(layer, *inputs)
        time.sleep(0.2)
        t0 = time.perf_counter()
        shards.servers[0].stop(None)
        out = step.wait()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        took = time.perf_counter() - t0  # not the 30 s deadline nor the 20 s delay (10 s: 2 loaded cores in CI)
        assert d.failovers >= 1 and d.hedges == 0 and took < 10.0, (d.failovers, d.hedges, took)
    finally:
        shards.servicers[0].faults.run_delay_s = 0.0
        d.close()
        shards.close()


def test_graceful_stop_answers_the_frames_running(files, halves):  # noqa: F811
    """stop(grace), as the shard deployment's scale-in does: a frame already running is answered (as on a gRPC
    stream, the connection is served until `grace`), then the connection ends and the next send fails."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        taken = halves.servicers[0].calls
        halves.servicers[0].faults.run_delay_s = 0.5
        running = t.send(address, lambda: _req(files, layer, seed=1), 10)
        deadline = time.monotonic() + 10
        while halves.servicers[0].calls == taken:  # the shard took the frame: it is running (not a sleep's guess)
            assert time.monotonic() < deadline, "the shard never took the frame"
            time.sleep(0.01)
        stopped = halves.servers[0].stop(3.0)  # its 0.5 s and compute fit the grace on a loaded machine too
        assert running.result(timeout=5).output.data
        assert stopped.wait(10)
        with pytest.raises(grpc.RpcError) as e:
            t.send(address, lambda: _req(files, layer, seed=2), 5).result(timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_deadline_is_per_request_and_the_connection_survives(files, halves):  # noqa: F811
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        halves.servicers[0].faults.run_delay_s = 1.0
        with pytest.raises(grpc.RpcError) as e:
            t.send(address, lambda: _req(files, layer), 0.2).result(timeout=5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        halves.servicers[0].faults.run_delay_s = 0.0
        conn = t._conns[address]
        assert t.send(address, lambda: _req(files, layer, seed=1), 5).result(timeout=10).output.data
        time.sleep(1.0)  # the late answer arrives and is dropped
        assert t._conns[address] is conn and not conn.dead and not conn.pending
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
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


def test_renewed_tls_files_reopen_connections_and_calls_in_flight_finish(files, halves):  # noqa: F811
    layer, address = halves.layers[0], halves.addresses[0]
    t = SocketTransport()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        old = t._conns[address]
        halves.servicers[0].faults.run_delay_s = 0.5
        in_flight = t.send(address, lambda: _req(files, layer, seed=1), 10)
        t.renewal.due = t.renewal.changed = lambda: True  # as tls.Renewal says after the files changed
        renewed = t.send(address, lambda: _req(files, layer, seed=2), 10)
        del t.renewal.due, t.renewal.changed
        assert in_flight.result(timeout=10).output.data and renewed.result(timeout=10).output.data
        assert old.retired and t._conns[address] is not old
        deadline = time.monotonic() + 5
        while not old.dead and time.monotonic() < deadline:  # answered, then closed
            time.sleep(0.01)
        assert old.dead and not old.pending
    finally:
        halves.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_a_connection_retired_while_opening_ends_once_open(files, halves):  # noqa: F811
    """Retired (renewed TLS files) while still opening, with no call pending: once open it ends at once instead of
    holding one of the shard's connections (and a thread here) for ever."""
    address, listener = halves.addresses[0], halves.servers[0].listener
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
