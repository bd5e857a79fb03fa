"""The stream transport (one RunExpertsStream per shard) under a dispatcher, over real in-process gRPC shards: same
results as the single process, failover when a shard dies mid-stream, hedging, reopening, closing, stream limits and
the deadline thread. Its frames on the wire: tests/test_transport_frames.py."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from elasticmoe.config import Limits
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import make_transport
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, encode_tensor
from tests.shard_util import ALL_BOTH, E, SPLIT, Shards, _inputs, _reference, _run, answer_within, files  # noqa: F401


@pytest.fixture
def pair(files):  # noqa: F811
    shards = Shards(files, [list(range(E)), list(range(E))])
    yield shards
    shards.close()


def _stream_dispatcher(**kw) -> GrpcDispatcher:
    return GrpcDispatcher(transport="stream", **kw)


def _request(files, layer: int, rows: int, seed: int) -> pb.RunExpertsRequest:
    hidden, ids, weights = _inputs(files, seed)
    return pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden[:rows]),
                                topk_ids=encode_tensor(ids[:rows].to(torch.int32)),
                                topk_weights=encode_tensor(weights[:rows]))


def test_config_selects_the_transport():
    assert Limits().transport == "socket"
    assert isinstance(make_transport(Limits(transport="stream").transport, insecure=False), StreamTransport)
    d = GrpcDispatcher()  # the deployed default when built without a config too
    assert isinstance(d.transport, SocketTransport) and Limits().transport == "socket"
    d.close()
    with pytest.raises(ValueError):
        Limits(transport="carrier-pigeon")


@pytest.mark.parametrize("transport", ["socket", "stream", "unary"])
def test_a_shard_share_over_the_message_limit_goes_in_several_calls(files, pair, transport):  # noqa: F811
    """A step whose share for one shard would make a frame over the message limit (a float64 reply [T_s, H] passes
    256 MiB from 4,682 tokens at H = 7168) goes to that shard in several calls, each within the limit: the same
    output as the single process. Here the limit is cut so that one call carries 3 rows."""
    layer = pair.layers[0]
    inputs = _inputs(files)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=5)
    try:
        d.set_table(pair.table(SPLIT))
        hidden = inputs[0]
        d.call_limit_bytes = 4096 + 3 * hidden.shape[1] * 8  # frames.max_rows: 3 rows of float64 reply
        assert d.max_call_rows(hidden, inputs[1].shape[1]) == 3
        calls0 = sum(s.calls for s in pair.servicers)
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        rows = {s: int(((inputs[1] // (E // 2)) == s).any(1).sum()) for s in (0, 1)}  # SPLIT: experts 0-3, 4-7
        want = sum(-(-n // 3) for n in rows.values())
        assert sum(s.calls for s in pair.servicers) - calls0 == want > 2, (rows, want)
        assert d.failovers == 0 and d.hedges == 0
    finally:
        d.close()


def test_stream_dispatch_equals_single_process(files, pair):  # noqa: F811
    layer = pair.layers[0]
    inputs = _inputs(files)
    ref = _reference(files, layer, *inputs)
    for copies in (SPLIT, ALL_BOTH):
        d = _stream_dispatcher(timeout_s=5)
        try:
            d.set_table(pair.table(copies))
            for _ in range(3):  # the same streams carry every step
                out, _ = _run(d, layer, inputs)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
            assert d.failovers == 0 and d.hedges == 0
            assert len(d.transport._streams) == 2  # one stream per shard
        finally:
            d.close()


def test_shard_stopped_mid_stream_fails_over(files, pair):  # noqa: F811
    layer, inputs = pair.layers[0], _inputs(files, 1)
    ref = _reference(files, layer, *inputs)
    reported: list[str] = []
    # no hedging (10 s): the copy on s1 is reached by failing over, when s0's stream breaks, not by a hedge at 0.1 s
    d = _stream_dispatcher(timeout_s=30, hedge_min_s=10.0, on_failure=lambda sid: reported.append(sid))
    try:
        d.set_table(pair.table(ALL_BOTH))
        _run(d, layer, inputs)  # both streams open
        pair.servicers[0].faults.run_delay_s = 20.0  # s0's frames hang in flight...
        step = d.dispatch(layer, *inputs)
        time.sleep(0.2)
        t0 = time.perf_counter()
        pair.servers[0].stop(None)  # ...and its server goes away: the stream breaks, every pending frame fails now
        out = step.wait()
        took = time.perf_counter() - t0
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # not the 30 s deadline, nor the 20 s delay (10 s: the step shares 2 loaded cores with the suite's e2e half)
        assert d.failovers >= 1 and d.hedges == 0 and took < 10.0, (d.failovers, d.hedges, took)
        deadline = time.monotonic() + 5
        while not reported and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reported == ["s0"]
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        d.close()


def test_stream_reopens_after_the_shard_restarts(files, pair):  # noqa: F811
    """A dead stream is replaced lazily: the next send opens a new one (here to a restarted server, same port)."""
    from elasticmoe.experts.shard_server import start_server

    layer, inputs = pair.layers[0], _inputs(files, 7)
    ref = _reference(files, layer, *inputs)
    d = _stream_dispatcher(timeout_s=5, suspect_s=0.0)
    try:
        d.set_table(pair.table(SPLIT))
        _run(d, layer, inputs)
        first = d.transport._streams[pair.addresses[0]]
        pair.servers[0].stop(None).wait()
        port = int(pair.addresses[0].rsplit(":", 1)[1])
        pair.servers[0], pair.servicers[0], _ = start_server(pair.stores[0], "s0", port=port)
        deadline = time.monotonic() + 5
        while not first.dead and time.monotonic() < deadline:
            time.sleep(0.01)
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert first.dead and d.transport._streams[pair.addresses[0]] is not first
    finally:
        d.close()


def test_stream_straggler_is_hedged(files, pair):  # noqa: F811
    layer, inputs = pair.layers[0], _inputs(files, 2)
    ref = _reference(files, layer, *inputs)
    d = _stream_dispatcher(timeout_s=10, hedge_min_s=0.05)
    try:
        d.set_table(pair.table(ALL_BOTH))
        for _ in range(5):
            _run(d, layer, inputs)
        pair.servicers[0].faults.run_delay_s = 8.0  # hedged at 0.05 s: 5 s is room for a loaded CI host, not 8 s
        out, took = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.hedges >= 1 and took < 5.0, (d.hedges, took)
        assert "s0" in d.suspects
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        d.close()


def test_close_fails_pending_calls(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = StreamTransport()
    pair.servicers[0].faults.run_delay_s = 2.0
    try:
        fut = t.send(address, lambda: _request(files, layer, 2, 0), 30)
        time.sleep(0.1)
        t.close()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=1)
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0


def test_streams_beyond_the_limit_are_refused_and_health_still_answers(files):  # noqa: F811
    """Each open stream holds a server worker: past max_streams a new one is refused, Health keeps its workers."""
    from elasticmoe.experts.shard_server import start_server
    from elasticmoe.model.experts import ExpertStore
    from elasticmoe.rpc import experts_pb2_grpc as pb_grpc

    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "s", max_workers=2, max_streams=1)
    address, first, second = f"127.0.0.1:{port}", StreamTransport(), StreamTransport()
    try:
        assert first.send(address, lambda: _request(files, layer, 3, 0), 5).result(timeout=10).output.data
        with pytest.raises(grpc.RpcError) as e:
            second.send(address, lambda: _request(files, layer, 3, 0), 5).result(timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stub = pb_grpc.ExpertShardStub(tls.channel(address, channel_options()))
        assert stub.Health(pb.HealthRequest(), timeout=5).ok
        first.close()  # its stream ends: the place is free again
        assert answer_within(second, address, lambda: _request(files, layer, 3, 1)).output.data
    finally:
        first.close()
        second.close()
        server.stop(None)


def test_deadline_thread_sweeps_in_grains_and_still_fails_late_calls():
    """Answered calls' entries expire one per call: the thread must sweep them in DEADLINE_GRAIN_S steps, not wake
    once per call; an unanswered call still fails with DEADLINE_EXCEEDED, at most a grain after its deadline."""
    from concurrent.futures import Future

    from elasticmoe.gateway.multiplex import DEADLINE_GRAIN_S, Deadlines

    class Conn:  # what Deadlines needs of a connection: take(id) -> its pending future or None
        def __init__(self):
            self.pending: dict[int, Future] = {}
            self.lock = threading.Lock()

        def take(self, frame_id):
            with self.lock:
                return self.pending.pop(frame_id, None)

    deadlines, conn, waits = Deadlines("test-deadlines"), Conn(), [0]
    real_wait = deadlines._cv.wait

    def counting_wait(timeout=None):
        waits[0] += 1
        return real_wait(timeout)

    deadlines._cv.wait = counting_wait
    late, failed_at = Future(), []
    late.add_done_callback(lambda f: failed_at.append(time.monotonic()))
    conn.pending[0] = late
    t0 = time.monotonic()
    deadlines.add(0.3, 0, conn)
    calls = 600  # answered calls, each leaving an entry: they expire one by one from 0.3 s to 1.2 s (~650 a second)
    for i in range(1, calls + 1):  # added at once: a loop paced by sleep(0.001) made 100-150 of them on a busy CI
        conn.pending[i] = Future()
        deadlines.add(0.3 + 0.9 * i / calls, i, conn)
        conn.take(i)
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as err:
        late.result(timeout=0)
    deadlines.close()
    watched = time.monotonic() - t0  # the thread waits a grain at least between sweeps: at most this many waits
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= failed_at[0] - t0 <= 0.3 + DEADLINE_GRAIN_S + 0.5, failed_at[0] - t0  # slack: a busy CI
    assert waits[0] <= watched / DEADLINE_GRAIN_S + 5 < calls / 2, (calls, waits[0], watched)  # once per call: ~600
