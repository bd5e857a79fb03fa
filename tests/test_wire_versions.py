"""The gateway <-> shard wire between releases (a rolling update: an old gateway talks to new shards and a new one to
old shards). Frames from another release are refused, never read as this release's: another layout (magic) or a
flag bit that changes what the tensors mean is answered INVALID_ARGUMENT naming it, a hint bit is ignored; a reply
alike is not read. Protobuf fields a newer peer adds are ignored. The gateway's log says what a shard refused.
Real shards (gRPC server, frame listener over mTLS), raw sockets and real bytes."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import ExpertsUnavailable
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import frame_socket, frames, tls
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.options import channel_options
from tests.shard_util import E, Shards, _inputs, _run, files, halves  # noqa: F401

FLAGS = 8 + 5  # the flags byte: the 8-byte prefix, then magic (4) and kind (1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _request(files, frame_id: int, layer: int) -> bytearray:  # noqa: F811
    hidden, ids, weights = _inputs(files)
    return bytearray(frames.encode_request(frame_id, layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32),
                                           weights[:4]))


def _exchange(servicer, *sent: bytes) -> dict[int, frames.Reply]:
    """The replies of a real shard's frame listener (mTLS) to `sent`, by frame id."""
    import socket

    raw = socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=10)
    with tls.client_ssl_context().wrap_socket(raw, server_hostname=tls.SERVER_NAME) as s:
        s.sendall(b"".join(sent))
        got = frame_socket.FrameReader(s).frames()
        replies = [frames.decode_reply(next(got)) for _ in sent]
    return {r.id: r for r in replies}


def test_a_frame_of_another_layout_is_refused_naming_both(files, halves):  # noqa: F811
    layer = halves.layers[0]
    newer = _request(files, 3, layer)
    newer[8:12] = b"EMF2"
    replies = _exchange(halves.servicers[0], newer, _request(files, 4, layer))
    assert replies[3].code == INVALID and replies[3].output is None
    assert "frame format b'EMF2'" in replies[3].error and "reads b'EMF1'" in replies[3].error
    assert replies[4].code == 0  # the connection serves on


def test_a_flag_that_changes_the_tensors_is_refused_and_a_hint_ignored(files, halves):  # noqa: F811
    """A newer gateway's frame with a flag bit this shard does not know. Before, every bit but DUPLICATE was ignored:
    a bit 4-7 (what the tensors mean changes) was served as a plain frame, its answer summed as if right."""
    layer = halves.layers[0]
    plain, hinted, required = _request(files, 1, layer), _request(files, 2, layer), _request(files, 3, layer)
    hinted[FLAGS] |= 0x02
    required[FLAGS] |= 0x10
    replies = _exchange(halves.servicers[0], plain, hinted, required)
    assert replies[1].code == 0 and replies[2].code == 0
    assert bytes(replies[2].output.data) == bytes(replies[1].output.data)  # a hint: the same answer
    assert replies[3].code == INVALID and replies[3].output is None
    assert "flags 0x10" in replies[3].error and "newer release" in replies[3].error


def test_a_reply_with_a_flag_that_changes_the_tensors_is_not_read():
    """A newer shard's answer: its output is not taken (the call fails as malformed and goes to another copy)."""
    reply = bytearray(frames.encode_reply(5, torch.ones(2, 4, dtype=torch.float64), [], 17))
    assert frames.decode_reply(bytes(reply)).output.shape == (2, 4)
    reply[FLAGS] |= 0x04  # a hint
    assert frames.decode_reply(bytes(reply)).compute_us == 17
    reply[FLAGS] |= 0x80
    with pytest.raises(frames.FrameError, match=r"frame 5: flags 0x84: bits 0x80 .* newer release") as e:
        frames.decode_reply(bytes(reply))
    assert e.value.frame_id == 5  # its own call fails, at once


def test_a_newer_gateways_unknown_request_field_is_ignored(files, halves):  # noqa: F811
    """A RunExpertsRequest with a field this release does not know (number 11, bytes) answers as without it."""
    layer = halves.layers[0]
    hidden, ids, weights = _inputs(files)
    msg = frames.ExpertRequest(layer, hidden[:4], (ids[:4] % (E // 2)).to(torch.int32), weights[:4]).to_proto()
    plain = msg.SerializeToString()
    newer = plain + bytes([11 << 3 | 2, 3]) + b"new"  # field 11, length 3
    channel = tls.channel(halves.addresses[0], channel_options())
    try:
        call = channel.unary_unary("/elasticmoe.internal.v1.ExpertShard/RunExperts",
                                   request_serializer=lambda b: b,
                                   response_deserializer=pb.RunExpertsResponse.FromString)
        a, b = call(plain, timeout=10), call(newer, timeout=10)
    finally:
        channel.close()
    assert torch.equal(decode_tensor(a.output), decode_tensor(b.output)) and not b.missing


def test_the_gateway_log_says_what_a_shard_refused(files, tmp_path, caplog):  # noqa: F811
    """A gateway of one checkpoint routed to a shard of another shape (a rolling update across a change of model,
    with a controller that predates config.weights_id): every call is refused INVALID_ARGUMENT naming the shapes.
    Before, the gateway logged only the code, and the shard nothing: the cause was nowhere."""
    other = open_model(str(make_tiny_model("mixtral", tmp_path / "wide", layers=2, experts=E, hidden=32)))
    shards = Shards(other, [list(range(E))])
    d = GrpcDispatcher(transport="socket", timeout_s=5, failover_s=0.5)
    try:
        d.set_table(shards.table({e: [0] for e in range(E)}))
        with pytest.raises(ExpertsUnavailable):
            _run(d, shards.layers[0], _inputs(files))  # hidden [T, 64] to a shard of hidden 32
    finally:
        d.close()
        shards.close()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "failed at layer" in
            r.getMessage()]
    assert said and all("INVALID_ARGUMENT" in m and "want [T, 32]" in m for m in said), said
