"""The stream transport's frames over real in-process gRPC shards: answers bit for bit equal to unary calls, frame
ids under concurrency, per-request deadlines, bad, unreadable and mutated frames, a send racing a renewal's close."""

from __future__ import annotations

import inspect
import sys
import threading
import time
from concurrent import futures as cf

import grpc
import pytest
import torch

from elasticmoe.gateway.stream_transport import STREAM_METHOD, StreamTransport, _Stream
from elasticmoe.gateway.transport import UnaryTransport
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.frames import ExpertRequest
from elasticmoe.rpc.codec import channel_options, decode_tensor
from tests.shard_util import E, Shards, _inputs, _reference, _req, answer_within, files  # noqa: F401
from tests.test_transport import _request, pair  # noqa: F401 - pair is a fixture


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
    assert [r.id for r in replies] == [0, 1, 2, 3, 4, 5]  # not an ExpertFrame: no header, answered as frame 0
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.code for r in replies] == [invalid, 0, invalid, invalid, invalid, 0]
    assert "not an ExpertFrame" in replies[0].error and "magic" in replies[2].error, replies[:3]
    assert "needs" in replies[3].error and "the frame has" in replies[3].error, replies[3]
    assert "dtype code 99" in replies[4].error, replies[4]
    torch.testing.assert_close(decode_tensor(replies[5].output), decode_tensor(replies[1].output), rtol=0, atol=0)


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
    hook = _pause_at(_Stream.submit, "self._put((frame_id, frame))", paused, go)

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


def test_a_client_that_never_reads_holds_the_shard_to_a_bounded_backlog(files, pair):  # noqa: F811
    """A stream client writes 1,200 frames of 256 tokens (64 KiB answers) and reads none: the shard stops taking
    frames once its answers back up (the HTTP/2 windows and a bounded reply queue), instead of running them all and
    holding every answer in memory; cancelling the stream frees the stream's place for the next client."""
    layer = pair.layers[0]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(256, files.spec.hidden_size, generator=g)
    ids = torch.randint(0, E, (256, 2), generator=g, dtype=torch.int32)
    frame = frames.encode_request(1, layer, hidden, ids, torch.rand(256, 2, generator=g))
    sent = 1200
    channel = tls.channel(pair.addresses[0], channel_options())
    try:
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=frames.decode_reply)
        replies = call(iter([frame] * sent), timeout=60)
        servicer, last, still = pair.servicers[0], -1, 0.0
        while still < 1.0:  # until the shard has taken no frame for a second
            time.sleep(0.1)
            still, last = (still + 0.1, last) if servicer.calls == last else (0.0, servicer.calls)
        window = 16 * (1 << 20) // (hidden.numel() * 4)  # answers the client's receive window holds
        assert servicer.calls < 2 * window + servicer.max_stream_replies + 64, servicer.calls
        replies.cancel()
    finally:
        channel.close()
    t = StreamTransport()
    try:
        assert answer_within(t, pair.addresses[0], lambda: _req(files, layer)).output is not None
    finally:
        t.close()
