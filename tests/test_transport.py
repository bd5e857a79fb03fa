"""The stream transport (one RunExpertsStream per shard) over real in-process gRPC shards: same results as the single
process, failover when a shard dies mid-stream, hedging, frame ids under concurrency, deadlines, bad frames."""

from __future__ import annotations

import inspect
import sys
import threading
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.config import Limits
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.transport import STREAM_METHOD, StreamTransport, UnaryTransport, _Stream, make_transport
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.frames import ExpertRequest
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor
from tests.test_failover import ALL_BOTH, E, SPLIT, Shards, _inputs, _reference, _run, files  # noqa: F401


@pytest.fixture
def pair(files):  # noqa: F811
    shards = Shards(files, [list(range(E)), list(range(E))])
    yield shards
    shards.close()


def _stream_dispatcher(**kw) -> GrpcDispatcher:
    return GrpcDispatcher(transport="stream", **kw)


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
        pair.servicers[0].faults.run_delay_s = 5.0  # s0's frames hang in flight...
        step = d.dispatch(layer, *inputs)
        time.sleep(0.2)
        t0 = time.perf_counter()
        pair.servers[0].stop(None)  # ...and its server goes away: the stream breaks, every pending frame fails now
        out = step.wait()
        took = time.perf_counter() - t0
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # not the 30 s deadline, nor the 5 s delay (3 s: the step shares 2 loaded cores with the suite's e2e half)
        assert d.failovers >= 1 and d.hedges == 0 and took < 3.0, (d.failovers, d.hedges, took)
        deadline = time.monotonic() + 5
        while not reported and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reported == ["s0"]
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        d.close()


def test_stream_reopens_after_the_shard_restarts(files, pair):  # noqa: F811
    """A dead stream is replaced lazily: the next send opens a new one (here to a restarted server, same port)."""
    from elasticmoe.experts.server import start_server

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
        pair.servicers[0].faults.run_delay_s = 3.0
        out, took = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.hedges >= 1 and took < 2.0, (d.hedges, took)
        assert "s0" in d.suspects
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        d.close()


def _request(files, layer: int, rows: int, seed: int) -> pb.RunExpertsRequest:
    hidden, ids, weights = _inputs(files, seed)
    return pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden[:rows]),
                                topk_ids=encode_tensor(ids[:rows].to(torch.int32)),
                                topk_weights=encode_tensor(weights[:rows]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stream_answers_equal_unary_bit_for_bit(files, dtype):  # noqa: F811
    """The same requests through both transports to one real shard (half the experts held): the same float64
    outputs bit for bit, the same missing experts; bf16 hidden travels as 2 bytes a value."""
    shards = Shards(files, [list(range(E // 2))])
    layer, address = shards.layers[0], shards.addresses[0]
    unary, stream = UnaryTransport(), StreamTransport()
    try:
        for seed in range(3):
            hidden, ids, weights = _inputs(files, seed)
            held = ids % (E // 2) if seed < 2 else ids  # seed 2 routes some tokens to experts not held
            req = ExpertRequest(layer, hidden.to(dtype), held.to(torch.int32), weights, placement_version=4)
            frame = frames.request_frame(1, req)
            assert frames.decode_request(frame).hidden.data.nbytes == hidden.numel() * dtype.itemsize
            a = unary.send(address, lambda: req, 10).result(timeout=20)
            b = stream.send(address, lambda: req, 10).result(timeout=20)
            assert list(a.missing) == b.missing and (seed == 2) == bool(b.missing)
            if not b.missing:
                out_a, out_b = decode_tensor(a.output), decode_tensor(b.output)
                assert out_b.dtype == torch.float64 and torch.equal(out_a, out_b)
    finally:
        unary.close()
        stream.close()
        shards.close()


def test_frame_ids_match_answers_under_concurrency(files, pair):  # noqa: F811
    """Many threads, requests of different sizes in flight on one stream: each answer is its own request's."""
    layer = pair.layers[0]
    t = StreamTransport()
    address = pair.addresses[0]
    try:
        def one(i: int) -> None:
            rows = 1 + i % 24
            req = _request(files, layer, rows, i)
            got = t.send(address, lambda: req, 10).result(timeout=20)
            hidden, ids, weights = _inputs(files, i)
            want = _reference(files, layer, hidden[:rows], ids[:rows], weights[:rows])
            torch.testing.assert_close(decode_tensor(got.output, "output"), want.double(), rtol=1e-5, atol=1e-6)

        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(64)))
        assert len(t._streams) == 1 and not t._streams[address].pending
    finally:
        t.close()


def test_deadline_is_per_request_and_the_stream_survives(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = StreamTransport()
    try:
        pair.servicers[0].faults.run_delay_s = 1.0
        slow = t.send(address, lambda: _request(files, layer, 4, 0), 0.2)
        with pytest.raises(grpc.RpcError) as e:
            slow.result(timeout=5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        pair.servicers[0].faults.run_delay_s = 0.0
        stream = t._streams[address]
        assert t.send(address, lambda: _request(files, layer, 4, 1), 5).result(timeout=10).output.data
        assert t._streams[address] is stream and not stream.dead  # a timeout does not break the stream
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        t.close()


def test_bad_frame_gets_its_status_and_the_stream_lives(files, pair):  # noqa: F811
    layer, address = pair.layers[0], pair.addresses[0]
    t = StreamTransport()
    try:
        hidden, ids, weights = _inputs(files)
        bad = ExpertRequest(999, hidden, ids.to(torch.int32), weights)
        with pytest.raises(grpc.RpcError) as e:
            t.send(address, lambda: bad, 5).result(timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layer" in e.value.details()
        assert t.send(address, lambda: _request(files, layer, 3, 0), 5).result(timeout=10).output.data
    finally:
        t.close()


def _wire(payload: bytes) -> bytes:
    """A frame as any protobuf writer would send it (the shard reads every encoding of ExpertFrame)."""
    return pb.ExpertFrame(frame=bytes(payload)).SerializeToString()


def test_unreadable_frames_fail_alone_on_one_stream(files, pair):  # noqa: F811
    """Raw bytes on one stream: a bad magic, a short tensor, an unknown dtype code and a non-message each get
    INVALID_ARGUMENT naming the fault; the good frames around them are answered on the same stream."""
    layer = pair.layers[0]
    hidden, ids, weights = _inputs(files)

    def payload(frame_id: int) -> bytearray:  # the frame bytes past the 8-byte ExpertFrame prefix
        return bytearray(frames.encode_request(frame_id, layer, hidden[:4], ids[:4].to(torch.int32), weights[:4])[8:])

    bad_magic, short, bad_dtype = payload(2), payload(3)[:-64], payload(4)
    bad_magic[:4] = b"XXXX"
    bad_dtype[frames.HEADER.size] = 99  # the first tensor's dtype code
    sent = [frames.encode_request(1, layer, hidden[:4], ids[:4].to(torch.int32), weights[:4]), _wire(bad_magic),
            _wire(short), _wire(bad_dtype), b"\xffnot a message", _wire(payload(5))]
    channel = tls.channel(pair.addresses[0], channel_options())
    try:
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=frames.decode_reply)
        replies = sorted(call(iter(sent), timeout=20), key=lambda r: (r.id, r.error))
    finally:
        channel.close()
    assert [r.id for r in replies] == [0, 0, 1, 3, 4, 5]  # an unreadable header: answered as frame 0
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.code for r in replies] == [invalid, invalid, 0, invalid, invalid, 0]
    assert "not an ExpertFrame" in replies[0].error and "magic" in replies[1].error, replies[:2]
    assert "needs" in replies[3].error and "the frame has" in replies[3].error, replies[3]
    assert "dtype code 99" in replies[4].error, replies[4]
    torch.testing.assert_close(decode_tensor(replies[5].output), decode_tensor(replies[2].output), rtol=0, atol=0)


def test_mutated_frames_each_get_one_answer(files, pair):  # noqa: F811
    """Random bytes of 60 frames' headers and tensor descriptors flipped (seeded): every frame gets exactly one
    reply, OK or INVALID_ARGUMENT (never INTERNAL, never a broken stream), and a good frame after them is served."""
    layer = pair.layers[0]
    hidden, ids, weights = _inputs(files)
    good = frames.encode_request(10**6, layer, hidden[:4], ids[:4].to(torch.int32), weights[:4])
    g = torch.Generator().manual_seed(14)
    head = 8 + frames.HEADER.size + 3 * frames.DESC.size  # prefix, header and descriptors
    sent = []
    for _ in range(60):
        wire = bytearray(good)
        for pos in torch.randint(3, head, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist():
            wire[pos] = int(torch.randint(0, 256, (1,), generator=g))
        sent.append(bytes(wire))
    channel = tls.channel(pair.addresses[0], channel_options())
    try:
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=frames.decode_reply)
        replies = list(call(iter(sent + [good]), timeout=60))
    finally:
        channel.close()
    assert len(replies) == len(sent) + 1
    assert {r.code for r in replies} <= {0, grpc.StatusCode.INVALID_ARGUMENT.value[0]}, {r.error for r in replies}
    assert sum(r.code != 0 for r in replies) >= 30  # most mutations are refused (the rest hit a field that may vary)
    assert any(r.id == 10**6 and r.code == 0 and r.output is not None for r in replies)


def _pause_at(fn, text: str, paused: threading.Event, go: threading.Event):
    """A trace function (sys.settrace) that stops the thread it traces at fn's source line holding `text`: it sets
    `paused`, then waits for `go` (a race's window held open, no code replaced)."""
    lines, first = inspect.getsourcelines(fn)
    at = first + next(i for i, line in enumerate(lines) if text in line)

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == at:
            paused.set()
            go.wait(10)
        return local
    return lambda frame, event, arg: local if frame.f_code is fn.__code__ else None


def test_a_frame_sent_as_a_renewal_half_closes_its_stream_is_still_answered(files, pair):  # noqa: F811
    """A renewal half-closes a stream (close) just after a send took its place on it: the frame still goes out before
    the end of stream and is answered. (Queued after the lock, it came after close's end marker: never sent, the
    call failed UNAVAILABLE and a healthy shard was reported failed.) The send is held there by a trace hook."""
    layer, address = pair.layers[0], pair.addresses[0]
    t = StreamTransport()
    stream = t._stream(address)
    paused, go = threading.Event(), threading.Event()
    hook = _pause_at(_Stream.submit, "self._out.put(frame)", paused, go)

    def send() -> cf.Future:
        sys.settrace(hook)
        try:
            return t.send(address, lambda: _request(files, layer, 4, 0), 10)
        finally:
            sys.settrace(None)
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send)
            assert paused.wait(10)
            closer = threading.Thread(target=stream.close)
            closer.start()
            closer.join(0.5)  # the half-close runs while the send is held (or waits for it)
            go.set()
            closer.join(10)
            reply = sent.result(10).result(timeout=10)
        assert reply.output.data and stream.dead
    finally:
        go.set()
        t.close()


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
    from elasticmoe.experts.server import start_server
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
        deadline = time.monotonic() + 5
        while True:
            try:
                assert second.send(address, lambda: _request(files, layer, 3, 1), 5).result(timeout=10).output.data
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        first.close()
        second.close()
        server.stop(None)


def test_deadline_thread_sweeps_in_grains_and_still_fails_late_calls():
    """Answered calls' entries expire one per call: the thread must sweep them in DEADLINE_GRAIN_S steps, not wake
    once per call; an unanswered call still fails with DEADLINE_EXCEEDED, at most a grain after its deadline."""
    from concurrent.futures import Future

    from elasticmoe.gateway.transport import DEADLINE_GRAIN_S, Deadlines

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
    calls = 0
    while time.monotonic() - t0 < 1.2:  # answered calls at ~1 kHz, each leaving an entry that expires 0.3 s on
        calls += 1
        conn.pending[calls] = Future()
        deadlines.add(0.3, calls, conn)
        conn.take(calls)
        time.sleep(0.001)
    with pytest.raises(grpc.RpcError) as err:
        late.result(timeout=0)
    deadlines.close()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.3 <= failed_at[0] - t0 <= 0.3 + DEADLINE_GRAIN_S + 0.5, failed_at[0] - t0  # slack: a busy CI
    assert calls > 150 and waits[0] <= 1.2 / DEADLINE_GRAIN_S + 5, (calls, waits[0])  # once per call: > 100
