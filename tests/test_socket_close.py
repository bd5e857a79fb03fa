"""A closed transport ends every call of its own: those on connections it retired (renewed TLS files) too, whose
answers may never come once nothing keeps their deadlines (socket and stream transports, real in-process shards)."""

from __future__ import annotations

import grpc
import pytest

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
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
