"""A closed transport ends every call of its own: those on connections it retired (renewed TLS files) too, whose
answers may never come once nothing keeps their deadlines; and a call sent after its close fails CANCELLED unsent,
no connection opened (socket, stream and unary transports, real in-process shards)."""

from __future__ import annotations

import grpc
import pytest

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import UnaryTransport
from tests.shard_util import _req, files, halves  # noqa: F401


@pytest.mark.parametrize("kind", [SocketTransport, StreamTransport], ids=["socket", "stream"])
def test_close_ends_the_calls_of_connections_retired_by_renewed_tls_files(files, halves, kind):  # noqa: F811
    """A call in flight on a connection retired by renewed TLS files, its shard slow to answer (stuck, say): the
    transport's close ends it CANCELLED at once, as it ends the calls of its current connections; it used to wait for
    the shard's answer with no deadline left (the deadline thread stops at close), for ever if none came."""
    layer, address = halves.layers[0], halves.addresses[0]
    t = kind()
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        halves.servicers[0].faults.run_delay_s = 4.0  # the shard answers long after the close
        in_flight = t.send(address, lambda: _req(files, layer, seed=1), 60)
        t.renewal.due = t.renewal.changed = lambda: True  # as tls.Renewal says after the files changed
        renewed = t.send(address, lambda: _req(files, layer, seed=2), 60)
        del t.renewal.due, t.renewal.changed
    finally:
        t.close()
    for fut in (renewed, in_flight):
        e = fut.exception(timeout=2)  # not the shard's answer after run_delay_s, nor a wait without end
        assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED, e
    halves.servicers[0].faults.run_delay_s = 0.0


@pytest.mark.parametrize("kind", [SocketTransport, StreamTransport, UnaryTransport], ids=["socket", "stream", "unary"])
def test_a_call_sent_after_close_fails_cancelled_and_opens_nothing(files, halves, kind):  # noqa: F811
    """A step still running when its gateway closes (the engine thread outlives runner.close's join) re-sends the
    calls the close cancelled. The socket and stream transports opened a new connection for them, which nothing
    closed any more (a frame-listener place and a thread for the life of the process, and calls with no deadline:
    the deadline thread had stopped); the unary transport raised out of send (RuntimeError from its pool) instead of
    failing the call's Future. Each now fails the call CANCELLED at once, sends nothing and opens no channel."""
    layer, (first, other) = halves.layers[0], halves.addresses
    t = kind()
    assert t.send(first, lambda: _req(files, layer), 5).result(timeout=10).output.data
    t.close()
    served = [s.calls for s in halves.servicers]
    for address in (first, other):  # the shard it had a connection to, and one it had none to
        fut = t.send(address, lambda: _req(files, layer, seed=1), 5)
        assert fut.done()  # at once
        e = fut.exception(timeout=5)
        assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED, e
    assert [s.calls for s in halves.servicers] == served  # nothing computed: nothing sent
    assert not t._stubs and not getattr(t, "_conns", None) and not getattr(t, "_streams", None)
