"""The socket transport's writes to a shard slow to read (a straggler, or frames larger than the socket's buffers):
the calling thread never waits for room; a writer thread owes the rest, in order; a shard that has not read its
queued frames refuses more as busy; one that reads nothing ends the connection (real in-process shards, mTLS and
plaintext)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
import time

import grpc
import pytest
import torch

from elasticmoe.gateway import socket_conn
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from tests.shard_util import E, Shards, _reference, files  # noqa: F401

FRAME_BYTES = 16 << 20  # larger than loopback's socket buffers (a few MiB): a shard not reading leaves most unsent


@pytest.fixture
def straggler(files):  # noqa: F811
    """One shard holding every expert; its calls sleep 1.5 s before computing (it reads its next frame after)."""
    shards = Shards(files, [list(range(E))], {0: {"insecure": False}})
    shards.servicers[0].faults.run_delay_s = 1.5
    yield shards
    shards.servicers[0].faults.run_delay_s = 0.0
    shards.close()


def _big(files, layer: int, seed: int) -> ExpertRequest:  # noqa: F811
    g = torch.Generator().manual_seed(seed)
    rows = FRAME_BYTES // (files.spec.hidden_size * 4)
    hidden = torch.randn(rows, files.spec.hidden_size, generator=g)  # [T, H]
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(64)]).repeat(rows // 64, 1)  # [T, 2]
    return ExpertRequest(layer, hidden, ids.to(torch.int32), torch.rand(rows, 2, generator=g))


@pytest.mark.parametrize("insecure", [False, True], ids=["mtls", "plaintext"])
def test_sends_to_a_straggler_return_at_once_and_are_answered_in_order(files, insecure, monkeypatch):  # noqa: F811
    """Three 16 MiB frames to a shard that sleeps 1.5 s per call: each send returns in well under a call's sleep
    (it used to wait on the caller's thread until the shard read: 3.3 s for the second), and every answer equals the
    single-process reference (the rest written later still points at live tensors, in order)."""
    # a frame waits for the shard up to 3 s plus three 16 MiB computations: on a loaded 2-core machine more than
    # SEND_TIMEOUT_S (10 s) without a byte moving, which ends the connection (tested below, not here)
    monkeypatch.setattr(frame_socket, "SEND_TIMEOUT_S", 60)
    shards = Shards(files, [list(range(E))], {0: {"insecure": insecure}})
    t = SocketTransport(insecure=insecure)
    try:
        layer = shards.layers[0]
        reqs = [_big(files, layer, seed) for seed in range(3)]
        small = ExpertRequest(layer, reqs[0].hidden[:4], reqs[0].topk_ids[:4], reqs[0].topk_weights[:4])
        assert t.send(shards.addresses[0], lambda: small, 10).result(timeout=10).output is not None  # connected
        shards.servicers[0].faults.run_delay_s = 1.5
        sent, futs = [], []
        for r in reqs:
            t0 = time.perf_counter()
            futs.append(t.send(shards.addresses[0], lambda r=r: r, 60))
            sent.append(time.perf_counter() - t0)
        assert max(sent) < 0.75, sent
        for r, f in zip(reqs, futs):
            want = _reference(files, layer, r.hidden, r.topk_ids, r.topk_weights)
            torch.testing.assert_close(decode_tensor(f.result(timeout=60).output), want.to(torch.float64))
    finally:
        shards.servicers[0].faults.run_delay_s = 0.0
        t.close()
        shards.close()


def test_a_shard_with_frames_unread_refuses_more_as_busy(files, straggler, monkeypatch):  # noqa: F811
    """With SPILL_FRAMES frames already waiting for the shard, one more fails at once as busy (another copy may
    take it; the gateway's memory stays bounded) while the waiting ones are still answered. The frames are built
    before the sends: built inside them (16 MiB each, on CI's loaded 2-core host) the sends spanned the shard's 1.5 s
    sleeps, it read frames as fast as they came, and the 5th was queued, not refused."""
    monkeypatch.setattr(socket_conn, "SPILL_FRAMES", 2)
    t = SocketTransport()
    try:
        layer = straggler.layers[0]
        reqs = [_big(files, layer, s) for s in range(5)]
        futs = [t.send(straggler.addresses[0], lambda r=r: r, 60) for r in reqs]
        with pytest.raises(grpc.RpcError) as e:
            futs[-1].result(timeout=1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and frames.BUSY in e.value.details()
        assert futs[0].result(timeout=60).output is not None
    finally:
        t.close()


def test_frames_unread_are_capped_in_bytes_too(files, straggler, monkeypatch):  # noqa: F811
    """Frames may be up to the message limit (256 MiB): SPILL_FRAMES of them could hold GBs per connection. A frame
    that would take the queue past SPILL_BYTES fails at once as busy; one larger than the cap still goes alone (the
    queue empty), and is answered as the single-process reference."""
    monkeypatch.setattr(socket_conn, "SPILL_BYTES", FRAME_BYTES // 2)
    t = SocketTransport()
    try:
        layer = straggler.layers[0]
        reqs = [_big(files, layer, s) for s in range(3)]
        futs = [t.send(straggler.addresses[0], lambda r=r: r, 60) for r in reqs]
        with pytest.raises(grpc.RpcError) as e:  # the 2nd too, unless the shard read the 1st in full by then
            futs[-1].result(timeout=1)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and frames.BUSY in e.value.details()
        r = reqs[0]
        want = _reference(files, layer, r.hidden, r.topk_ids, r.topk_weights)
        torch.testing.assert_close(decode_tensor(futs[0].result(timeout=60).output), want.to(torch.float64))
    finally:
        t.close()


def test_a_shard_that_reads_nothing_ends_the_connection_not_the_callers_step(
        files, straggler, monkeypatch):  # noqa: F811
    """The writer thread waits at most SEND_TIMEOUT_S for room (4 s here, the shard asleep for 20 s per call): then
    the connection ends and its calls fail UNAVAILABLE (failover's signal), while no send ever held its caller.
    The frames are built and the connection opened before the sends are timed: on a loaded 2-core machine, making
    three 16 MiB requests and connecting took 1.6 s, which says nothing about a send waiting for room. A send that
    waited for room would hold its caller SEND_TIMEOUT_S; the sends get 3 s (they take milliseconds when quiet)."""
    monkeypatch.setattr(frame_socket, "SEND_TIMEOUT_S", 4)
    t = SocketTransport()
    try:
        layer = straggler.layers[0]
        reqs = [_big(files, layer, s) for s in range(3)]
        small = ExpertRequest(layer, reqs[0].hidden[:4], reqs[0].topk_ids[:4], reqs[0].topk_weights[:4])
        straggler.servicers[0].faults.run_delay_s = 0.0
        assert t.send(straggler.addresses[0], lambda: small, 10).result(timeout=10).output is not None  # connected
        straggler.servicers[0].faults.run_delay_s = 20.0
        t0 = time.perf_counter()
        futs = [t.send(straggler.addresses[0], lambda r=r: r, 60) for r in reqs]
        assert time.perf_counter() - t0 < 3.0
        with pytest.raises(grpc.RpcError) as e:
            futs[-1].result(timeout=15)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    finally:
        t.close()


class _HoldFirstWriter:
    """A connection's _send_lock that holds its first writer thread after the lock hold in which it took a written
    frame off the queue, until `sent` is set: the moment a caller may find the queue empty and write a frame."""

    def __init__(self, lock):
        self.lock, self.popped, self.sent = lock, threading.Event(), threading.Event()
        self.writer, self.holds = None, 0

    def __enter__(self):
        me = threading.current_thread()
        if me.name.startswith("frames-out-") and self.writer in (None, me):
            self.writer, self.holds = me, self.holds + 1
            if self.holds == 3:  # a third look at the queue, after the pop: the next frame's sender went first
                self.sent.wait(10)
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if threading.current_thread() is self.writer and self.holds == 2:  # the first frame written and popped
            self.popped.set()


def test_a_frame_sent_as_the_writer_thread_ends_is_written_once(files, straggler):  # noqa: F811
    """The writer thread takes its last frame off the queue; before it looks at the queue again, a caller finds it
    empty, writes part of a frame and starts a writer thread for the rest. The old writer must not write that rest
    too (the shard read the frame's tail twice: a garbled stream, the connection's calls failed)."""
    address, layer = straggler.addresses[0], straggler.layers[0]
    t = SocketTransport()
    try:
        reqs = [_big(files, layer, seed) for seed in range(2)]
        small = ExpertRequest(layer, reqs[0].hidden[:4], reqs[0].topk_ids[:4], reqs[0].topk_weights[:4])
        assert t.send(address, lambda: small, 30).result(timeout=30).output is not None  # connected
        conn = t._conns[address]
        gate = conn._send_lock = _HoldFirstWriter(conn._send_lock)
        # the shard sleeps in this call and reads nothing meanwhile, so the first 16 MiB frame cannot all go into
        # the sockets' buffers at once: its rest spills to a writer thread (a shard reading as fast as the caller
        # wrote let the caller write it all, no writer thread started, and `popped` never came: seen once, loaded)
        busy = t.send(address, lambda: small, 60)
        futs = [t.send(address, lambda: reqs[0], 60)]
        assert gate.popped.wait(30)  # the shard read all of the first frame; the writer thread took it off
        futs.append(t.send(address, lambda: reqs[1], 60))  # part written now (the shard computes, then reads)
        gate.sent.set()
        futs.append(t.send(address, lambda: small, 60))
        assert busy.result(timeout=60).output is not None
        for r, f in zip([*reqs, small], futs):
            want = _reference(files, layer, r.hidden, r.topk_ids, r.topk_weights)
            torch.testing.assert_close(decode_tensor(f.result(timeout=60).output), want.to(torch.float64))
    finally:
        t.close()


def _records(raw, plain_bytes: int) -> list[int]:
    """The plaintext sizes of the TLS 1.3 records read raw off `raw` (the fd's own recv, under its SSL object)
    until they carry plain_bytes: each record is a 5-byte header, then its plaintext, a type byte and a 16-byte tag."""
    import socket
    buf, sizes, at = b"", [], 0
    while sum(sizes) < plain_bytes:
        chunk = socket.socket.recv(raw, 1 << 20)
        assert chunk, "end of stream"
        buf += chunk
        while len(buf) - at >= 5 and len(buf) - at >= 5 + int.from_bytes(buf[at + 3:at + 5], "big"):
            assert buf[at] == 23  # application data
            n = int.from_bytes(buf[at + 3:at + 5], "big")
            sizes.append(n - 17)
            at += 5 + n
    return sizes


def test_a_frame_queued_whole_goes_in_as_few_tls_records_as_one_written_at_once(files, tmp_path):  # noqa: F811
    """A frame queued whole behind a frame the socket could not take (never attempted) is written by the writer
    thread as send_parts writes it (small pieces joined: one TLS record, one write), not one record per piece."""
    import socket

    from elasticmoe.rpc import tls
    from elasticmoe.rpc.tls_socket import SerialTLS

    ca = tls.local_ca(tmp_path / "ca")
    a, b = socket.socketpair()
    out: dict = {}
    server = threading.Thread(target=lambda: out.update(s=tls.server_ssl_context(ca).wrap_socket(b, server_side=True)))
    server.start()
    client = tls.client_ssl_context(ca).wrap_socket(a, server_hostname=tls.SERVER_NAME)
    server.join(10)
    peer = out["s"]
    assert peer.version() == "TLSv1.3"
    conn = socket_conn._Conn("pair", lambda: (SerialTLS(client, send_timeout_s=10), 0))
    try:
        deadline = time.monotonic() + 10
        while conn._backlog is not None:  # open
            assert time.monotonic() < deadline
            time.sleep(0.01)
        layer = files.spec.moe.moe_layers[0]
        big, small = _big(files, layer, 0), _big(files, layer, 1)
        small = ExpertRequest(layer, small.hidden[:4], small.topk_ids[:4], small.topk_weights[:4])
        first, second = frames.request_parts(1, big), frames.request_parts(2, small)
        for i, parts in enumerate((first, second)):
            fut = Future()
            fut.set_running_or_notify_cancel()
            assert conn.submit(i + 1, parts, fut)
        assert len(conn._spill) == 2  # the socket took part of the first: the second queued whole
        size = [sum(memoryview(p).nbytes for p in parts) for parts in (first, second)]
        sizes = _records(peer, sum(size))
        at = next(i for i in range(len(sizes) + 1) if sum(sizes[:i]) == size[0])  # records never span frames
        assert sizes[at:] == [size[1]]  # as send_parts writes it: small pieces joined in one record
    finally:
        conn.retire()
        conn.fail(grpc.RpcError())
        client.close()
        peer.close()
