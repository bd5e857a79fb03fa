"""Replies the gateway's socket transport cannot read although their framing is intact, over real in-process shards:
the call they answer fails alone (INTERNAL), the other calls on that connection get their answers and the connection
stays open."""

from __future__ import annotations

import threading

import grpc
import pytest

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.rpc import frames
from tests.shard_util import _req, files, halves  # noqa: F401


def _corrupt_first_reply(servicer, gate: threading.Event) -> None:
    """The shard answers its first frame, once `gate` is set, with an OK reply whose `missing` is int64 (framing
    intact, decode_reply refuses it); later frames as usual."""
    frame, bad_id = servicer._frame, []

    def corrupting(req, put):
        if bad_id:
            return frame(req, put)
        bad_id.append(req.id)
        gate.wait(5)
        output = frames.WireTensor(memoryview(b""), "float32", (0, 0))
        missing = frames.WireTensor(memoryview(bytes(8)), "int64", (1,))
        put(frames._parts(frames.REPLY, req.id, 0, b"", 0, 0, [output, missing]))
        servicer._run_slots.release()

    servicer._frame = corrupting


@pytest.mark.parametrize("kind", ["socket", "stream"])
def test_an_unreadable_reply_fails_its_call_only(files, halves, kind):  # noqa: F811
    """The first frame's reply cannot be read while a second frame is in flight: only the first call fails; the
    second gets its answer, and the connection (socket) or RunExpertsStream (stream) stays open for the next call."""
    from elasticmoe.gateway.stream_transport import StreamTransport

    layer, address = halves.layers[0], halves.addresses[0]
    gate = threading.Event()
    _corrupt_first_reply(halves.servicers[0], gate)
    t = SocketTransport() if kind == "socket" else StreamTransport()
    links = (lambda: t._conns) if kind == "socket" else (lambda: t._streams)
    try:
        first = t.send(address, lambda: _req(files, layer), 10)
        second = t.send(address, lambda: _req(files, layer, seed=1), 10)
        gate.set()
        with pytest.raises(grpc.RpcError) as e:
            first.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert second.result(timeout=10).output.data  # not failed with the first
        link = links()[address]
        assert not link.dead
        assert t.send(address, lambda: _req(files, layer, seed=2), 10).result(timeout=10).output.data
        assert links()[address] is link
    finally:
        gate.set()
        t.close()
