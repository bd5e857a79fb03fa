"""A stream or socket transport call past its deadline puts no bytes on the wire: one sent with no time left fails
DEADLINE_EXCEEDED unsent, and frames still queued for a shard slow to read (the stream's queue, the socket's spilled
frames) when their calls pass their deadlines are dropped, not sent for the shard to compute all the same (it did:
each one cost the shard a computation nobody read, ahead of the calls still waited for). Real in-process shards;
the shard's own call counter tells what it computed."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.rpc.frames import ExpertRequest
from tests.shard_util import E, Shards, _req, files  # noqa: F401


@pytest.fixture
def shard(files):  # noqa: F811
    """One shard holding every expert (plaintext: the socket's writes spill sooner than through TLS's records)."""
    shards = Shards(files, [list(range(E))], {0: {"insecure": True}})
    yield shards
    shards.servicers[0].faults.run_delay_s = 0.0
    shards.close()


def _make(kind: str):
    return StreamTransport(insecure=True) if kind == "stream" else SocketTransport(insecure=True)


def _big(files, layer: int, mib: int, seed: int) -> ExpertRequest:  # noqa: F811
    g = torch.Generator().manual_seed(seed)
    rows = (mib << 20) // (files.spec.hidden_size * 4)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(64)]).repeat(rows // 64, 1)  # [T, 2]
    return ExpertRequest(layer, torch.randn(rows, files.spec.hidden_size, generator=g), ids.to(torch.int32),
                         torch.rand(rows, 2, generator=g))


def _asleep(t, files, shard, delay_s: float):  # noqa: F811
    """Connect `t` to the shard (one call answered), then put the shard to sleep `delay_s` in a call of its own:
    (the shard's calls before it, that call's future)."""
    layer, address, servicer = shard.layers[0], shard.addresses[0], shard.servicers[0]
    assert t.send(address, lambda: _req(files, layer), 10).result(timeout=10).output.data  # connected
    before = servicer.calls
    servicer.faults.run_delay_s = delay_s
    blocker = t.send(address, lambda: _req(files, layer, seed=1), 60)
    time.sleep(0.2)  # the shard is asleep in it
    return before, blocker


def _deadline_exceeded(fut, timeout_s: float = 10) -> None:
    with pytest.raises(grpc.RpcError) as e:
        fut.result(timeout=timeout_s)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value


@pytest.mark.parametrize("kind", ["stream", "socket"])
def test_a_call_with_no_time_left_fails_unsent(files, shard, kind):  # noqa: F811
    """timeout 0: DEADLINE_EXCEEDED at once, and the shard computes nothing for it (the next call on the same
    connection, answered in order after it, finds the shard's counter up by its own call only)."""
    layer, address, servicer = shard.layers[0], shard.addresses[0], shard.servicers[0]
    t = _make(kind)
    try:
        assert t.send(address, lambda: _req(files, layer), 10).result(timeout=10).output.data  # connected
        before = servicer.calls
        _deadline_exceeded(t.send(address, lambda: _req(files, layer, seed=1), 0))
        assert t.send(address, lambda: _req(files, layer, seed=2), 10).result(timeout=10).output.data
        assert servicer.calls == before + 1, servicer.calls - before
    finally:
        t.close()


@pytest.mark.parametrize("kind", ["stream", "socket"])
def test_frames_queued_past_their_deadline_are_not_sent(files, shard, kind):  # noqa: F811
    """A shard asleep 1.5 s in a call; meanwhile SENT calls of large frames with a 0.5 s deadline queue behind it
    (gRPC takes a stream's next frame only once the last is sent, within its window; the socket's writer thread
    waits for room). All fail DEADLINE_EXCEEDED; the shard then computes only the few frames that were already on
    their way (in the windows and socket buffers), not all SENT."""
    layer, address, servicer = shard.layers[0], shard.addresses[0], shard.servicers[0]
    mib = 4 if kind == "stream" else 16  # the stream's window takes 16 MiB; the socket's buffers a few MiB
    sent = 12 if kind == "stream" else 6
    reqs = [_big(files, layer, mib, seed) for seed in range(sent)]
    t = _make(kind)
    try:
        before, blocker = _asleep(t, files, shard, 1.5)
        late = [t.send(address, lambda r=r: r, 0.5) for r in reqs]
        for f in late:
            _deadline_exceeded(f)
        servicer.faults.run_delay_s = 0.0
        assert blocker.result(timeout=30).output.data
        assert t.send(address, lambda: _req(files, layer, seed=2), 60).result(timeout=60).output.data
        computed = servicer.calls - before - 2  # of the late frames
        assert computed <= sent // 2, (computed, sent)
    finally:
        servicer.faults.run_delay_s = 0.0
        t.close()


def _slow_health(monkeypatch, seconds: float) -> None:
    """Shards started after this take `seconds` to answer Health (a busy pool): a socket connection opens late."""
    from elasticmoe.experts.server import ExpertServicer

    health = ExpertServicer.Health

    def slow_health(self, request, context):
        time.sleep(seconds)
        return health(self, request, context)
    monkeypatch.setattr(ExpertServicer, "Health", slow_health)  # before the server registers its handlers


def test_a_frame_whose_deadline_passed_while_connecting_is_not_sent(files, monkeypatch):  # noqa: F811
    """The socket transport keeps the frames sent while its connection opens (Health, TCP, TLS) and writes them once
    open: one whose call passed its deadline meanwhile is dropped. The shard's Health takes 1 s here (a busy pool)."""
    _slow_health(monkeypatch, 1.0)
    shards = Shards(files, [list(range(E))], {0: {"insecure": True}})
    layer, address, servicer = shards.layers[0], shards.addresses[0], shards.servicers[0]
    t = SocketTransport(insecure=True)
    try:
        _deadline_exceeded(t.send(address, lambda: _req(files, layer), 0.3))
        assert t.send(address, lambda: _req(files, layer, seed=1), 10).result(timeout=10).output.data
        assert servicer.calls == 1, servicer.calls
    finally:
        t.close()
        shards.close()


@pytest.mark.parametrize("bound", ["frames", "bytes"])
def test_frames_sent_while_connecting_are_bounded_as_the_spill(files, monkeypatch, bound):  # noqa: F811
    """The socket transport's frames sent while its connection opens (Health, TCP, TLS: 1.5 s here) waited in a list
    with no bound (100 frames to a listener that never answers Health: all 100 kept). They are now bounded as the
    spilled frames they become once open (SPILL_FRAMES, SPILL_BYTES; 3 here): one more is refused as busy, once the
    frames of calls that ended meanwhile are dropped. The frames taken are answered as the reference; the refused
    and the ended ones are never computed."""
    from elasticmoe.gateway import socket_conn
    from elasticmoe.gateway.transport import is_busy
    from elasticmoe.rpc import frame_socket, frames
    from elasticmoe.rpc.codec import decode_tensor
    from tests.shard_util import _reference

    _slow_health(monkeypatch, 1.5)
    shards = Shards(files, [list(range(E))], {0: {"insecure": True}})
    layer, address, servicer = shards.layers[0], shards.addresses[0], shards.servicers[0]
    reqs = [_req(files, layer, seed=seed) for seed in range(5)]
    size = frame_socket.nbytes(frames.request_parts(1, reqs[0]))  # each frame's (the same shapes)
    monkeypatch.setattr(socket_conn, "SPILL_FRAMES", 3 if bound == "frames" else 100)
    monkeypatch.setattr(socket_conn, "SPILL_BYTES", 1 << 30 if bound == "frames" else 3 * size + size // 2)
    t = SocketTransport(insecure=True)
    try:
        ended = t.send(address, lambda: reqs[0], 0.3)
        taken = [t.send(address, lambda r=r: r, 20) for r in reqs[1:3]]
        refused = t.send(address, lambda: reqs[3], 20)  # a 4th: busy at once
        assert refused.done() and is_busy(refused.exception()), refused.exception()
        _deadline_exceeded(ended)
        taken.append(t.send(address, lambda: reqs[4], 20))  # the ended frame counts for nothing: taken
        assert not (taken[-1].done() and taken[-1].exception() is not None), taken[-1].exception()
        for r, f in zip(reqs[1:3] + reqs[4:], taken):
            got = decode_tensor(f.result(timeout=20).output)
            torch.testing.assert_close(got.float(), _reference(files, layer, r.hidden, r.topk_ids, r.topk_weights)
                                       .float(), rtol=1e-5, atol=1e-6)
        assert servicer.calls == 3, servicer.calls
    finally:
        t.close()
        shards.close()


def test_a_unary_call_that_waited_for_a_worker_keeps_its_deadline(files, shard):  # noqa: F811
    """The unary transport's calls wait for a worker of its pool (one here): a call given 0.3 s that waited 1 s behind
    a straggling one fails DEADLINE_EXCEEDED, unsent (it went out with a fresh 0.3 s and was answered, at 1 s)."""
    layer, address, servicer = shard.layers[0], shard.addresses[0], shard.servicers[0]
    t = UnaryTransport(insecure=True, workers=1)
    try:
        assert t.send(address, lambda: _req(files, layer), 10).result(timeout=10).output.data  # connected
        before = servicer.calls
        servicer.faults.run_delay_s = 1.0
        first = t.send(address, lambda: _req(files, layer, seed=1), 10)
        time.sleep(0.2)  # the shard is asleep in it, the pool's one worker waiting for its answer
        servicer.faults.run_delay_s = 0.0
        _deadline_exceeded(t.send(address, lambda: _req(files, layer, seed=2), 0.3))
        assert first.result(timeout=10).output.data
        assert servicer.calls == before + 1, servicer.calls - before
    finally:
        servicer.faults.run_delay_s = 0.0
        t.close()


@pytest.mark.parametrize("kind", ["stream", "socket"])
def test_frames_of_ended_calls_do_not_hold_the_queue_bound(files, shard, kind, monkeypatch):  # noqa: F811
    """The stream's queue (QUEUE_FRAMES) and the socket's spilled frames (SPILL_FRAMES) are bounded; frames whose
    calls passed their deadline unsent counted against the bound until the writer reached them, so a new call to a
    shard still asleep was refused as busy though nothing live waited. Now a call finding the bound reached first
    drops the ended frames not begun: it is taken, and answered once the shard wakes; the ended ones go unsent."""
    from elasticmoe.gateway import socket_conn, stream_transport

    monkeypatch.setattr(stream_transport, "QUEUE_FRAMES", 3)
    monkeypatch.setattr(socket_conn, "SPILL_FRAMES", 3)
    layer, address, servicer = shard.layers[0], shard.addresses[0], shard.servicers[0]
    mib = 4 if kind == "stream" else 16  # as above: more than the stream's window / the socket's buffers take
    reqs = [_big(files, layer, mib, seed) for seed in range(12 if kind == "stream" else 6)]
    t = _make(kind)
    try:
        before, blocker = _asleep(t, files, shard, 2.0)
        late = [t.send(address, lambda r=r: r, 0.3) for r in reqs]
        busy = [f for f in late if f.done() and f.exception() is not None
                and f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert busy, "the bound was never reached: the test shows nothing"
        for f in late:
            if f not in busy:
                _deadline_exceeded(f)
        fresh = t.send(address, lambda: _req(files, layer, seed=2), 60)  # the shard is still asleep
        time.sleep(0.05)
        assert not (fresh.done() and fresh.exception() is not None), fresh.exception()
        servicer.faults.run_delay_s = 0.0
        assert blocker.result(timeout=30).output.data
        assert fresh.result(timeout=30).output.data
        computed = servicer.calls - before - 2  # of the late frames: only those already on their way
        assert computed <= len(reqs) - len(busy) - 1, (computed, len(reqs), len(busy))
    finally:
        servicer.faults.run_delay_s = 0.0
        t.close()
