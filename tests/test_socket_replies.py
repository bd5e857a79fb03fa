"""Replies the gateway's socket transport cannot read although their framing is intact, over real in-process shards:
the call they answer fails alone (INTERNAL), the other calls on that connection get their answers and the connection
stays open."""

from __future__ import annotations

import threading

import grpc
import pytest

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc import frames
from tests.test_failover import E, Shards, files  # noqa: F401
from tests.test_socket_transport import _req


@pytest.fixture
def pair(files):  # noqa: F811
    shards = Shards(files, [list(range(E // 2)), list(range(E // 2, E))])
    yield shards
    shards.close()


def test_an_unreadable_reply_fails_its_call_only(files, pair):  # noqa: F811
    """The shard answers the first frame with an OK reply whose `missing` is int64 (framing intact, decode_reply
    refuses it) while a second frame is in flight: only the first call fails; the second gets its answer and the
    connection stays open for the next call."""
    layer, address = pair.layers[0], pair.addresses[0]
    servicer, frame = pair.servicers[0], pair.servicers[0]._frame
    gate, bad_id = threading.Event(), []

    def corrupting(req, put):
        if not bad_id:  # the first frame: hold its bad reply until the second frame has been sent
            bad_id.append(req.id)
            gate.wait(5)
            output = frames.WireTensor(memoryview(b""), "float32", (0, 0))
            missing = frames.WireTensor(memoryview(bytes(8)), "int64", (1,))
            put(frames._parts(frames.REPLY, req.id, 0, b"", 0, 0, [output, missing]))
            servicer._run_slots.release()
            return
        frame(req, put)

    servicer._frame = corrupting
    t = SocketTransport()
    try:
        first = t.send(address, lambda: _req(files, layer), 10)
        second = t.send(address, lambda: _req(files, layer, seed=1), 10)
        gate.set()
        with pytest.raises(grpc.RpcError) as e:
            first.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert second.result(timeout=10).output.data  # not failed with the first
        conn = t._conns[address]
        assert not conn.dead
        assert t.send(address, lambda: _req(files, layer, seed=2), 10).result(timeout=10).output.data
        assert t._conns[address] is conn
    finally:
        gate.set()
        t.close()


def test_an_unreadable_reply_fails_its_call_only_on_the_stream_transport(files, pair):  # noqa: F811
    """As above, on one RunExpertsStream: the stream is not ended by the one reply it cannot read."""
    from elasticmoe.gateway.stream_transport import StreamTransport

    layer, address = pair.layers[0], pair.addresses[0]
    servicer, frame = pair.servicers[0], pair.servicers[0]._frame
    gate, bad_id = threading.Event(), []

    def corrupting(req, put):
        if not bad_id:
            bad_id.append(req.id)
            gate.wait(5)
            output = frames.WireTensor(memoryview(b""), "float32", (0, 0))
            missing = frames.WireTensor(memoryview(bytes(8)), "int64", (1,))
            put(frames._parts(frames.REPLY, req.id, 0, b"", 0, 0, [output, missing]))
            servicer._run_slots.release()
            return
        frame(req, put)

    servicer._frame = corrupting
    t = StreamTransport()
    try:
        first = t.send(address, lambda: _req(files, layer), 10)
        second = t.send(address, lambda: _req(files, layer, seed=1), 10)
        gate.set()
        with pytest.raises(grpc.RpcError) as e:
            first.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert second.result(timeout=10).output.data
        stream = t._streams[address]
        assert not stream.dead
        assert t.send(address, lambda: _req(files, layer, seed=2), 10).result(timeout=10).output.data
        assert t._streams[address] is stream
    finally:
        gate.set()
        t.close()
