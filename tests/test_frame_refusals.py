"""A frame listener's refusals read as 'shard busy' by the socket transport, whatever the gateway's socket sees after
them (its writes or reads reset by a refusal closed at once, over the lingering cap)."""

from __future__ import annotations

import time
from concurrent import futures as cf

import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway import socket_conn
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.transport import is_busy
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frame_listener, frames
from tests.shard_util import E, _req, files  # noqa: F401


def test_a_refusal_closed_at_once_still_reads_as_busy(files, monkeypatch):  # noqa: F811
    """Over REFUSE_LINGERING refusals at once, the listener writes 'shard busy' and closes at once: the frames the
    gateway wrote meanwhile are answered with a reset, so its writes fail (broken pipe) and its reads may too. The
    refusal is in its socket all the same: the calls fail as busy (the shard is alive), not UNAVAILABLE (a broken
    connection, a dead shard to the controller)."""
    monkeypatch.setattr(frame_listener, "REFUSE_LINGERING", 0)  # every refusal closes at once
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layer = files.spec.moe.moe_layers[0]
    store.load([(layer, e) for e in range(E)])
    server, _, port = start_server(store, "s", max_workers=2, max_streams=1)
    address, first, second = f"127.0.0.1:{port}", SocketTransport(), SocketTransport()
    stub, _ = second.stub(address)

    def late_open():  # open, then let the listener refuse and close before the frames go out
        sock, limit = second._open(address, stub)
        time.sleep(0.3)
        return sock, limit
    try:
        assert first.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        for _ in range(3):
            conn = socket_conn._Conn(address, late_open)
            calls = [cf.Future() for _ in range(3)]
            for i, fut in enumerate(calls):
                fut.set_running_or_notify_cancel()
                assert conn.submit(i + 1, frames.request_parts(i + 1, _req(files, layer, seed=i)), fut)
            for fut in calls:
                e = fut.exception(timeout=10)
                assert is_busy(e), e
            assert is_busy(conn.error), conn.error
    finally:
        first.close()
        second.close()
        server.stop(None).wait(10)
