"""A transport's retain (a new routing table's addresses, from the table poller's thread) while a connection opened
meanwhile learns its shard's message limit (Health, on the connection's or gRPC's thread): real in-process shards,
one whose Health answers only when the test lets it."""

from __future__ import annotations

import threading
import time

import pytest

from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import UnaryTransport
from tests.shard_util import E, Shards, _req, files, gated_health  # noqa: F401


class _Kept:
    """retain's addresses: `kept` only. Its look at `dropped` once that shard's channel is gone (retain's pass over
    the limits, after the connections' and channels') lets `gate` open and waits there until the transport knows
    `learnt`'s limit: a Health answer landing while retain goes through the limits."""

    def __init__(self, kept: list[str], dropped: str, gate: threading.Event, t, learnt: str):
        self.kept, self.dropped, self.gate, self.t, self.learnt = kept, dropped, gate, t, learnt
        self.waited = False

    def __contains__(self, address: str) -> bool:
        if address == self.dropped and address not in self.t._stubs and not self.waited:
            self.waited = True
            self.gate.set()
            end = time.monotonic() + 10
            while not self.t.limit(self.learnt) and time.monotonic() < end:
                time.sleep(0.01)
            assert self.t.limit(self.learnt), "the shard's Health never answered"
        return address in self.kept

    def __iter__(self):
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)


@pytest.mark.parametrize("kind", [SocketTransport, StreamTransport, UnaryTransport], ids=["socket", "stream", "unary"])
def test_retain_while_a_new_connection_learns_its_shards_limit(files, monkeypatch, kind):  # noqa: F811
    """retain went through the shards' limits while the Health answers of connections just opened added theirs
    (without the lock retain holds): 'dictionary changed size during iteration' out of set_table or the engine's
    begin_step (a step failed). A table drops shard s0 (its limit known) as s1's connection opens, s1's Health held
    until retain is in its pass over the limits: retain returns, s0's limit is forgotten, s1's kept and its call
    answered."""
    gate = gated_health(monkeypatch, "s1")
    shards = Shards(files, [list(range(E)), list(range(E))], {0: {"insecure": True}, 1: {"insecure": True}})
    layer, (dropped, new) = shards.layers[0], shards.addresses
    t = kind(insecure=True)
    try:
        assert t.send(dropped, lambda: _req(files, layer), 10).result(timeout=10).output.data
        end = time.monotonic() + 10
        while not t.limit(dropped) and time.monotonic() < end:  # the stream's and unary's Health: in the background
            time.sleep(0.01)
        assert t.limit(dropped)
        call = t.send(new, lambda: _req(files, layer, seed=1), 20)  # its limit not known yet (Health held)
        assert not t.limit(new)
        kept = _Kept([new], dropped, gate, t, new)
        t.retain(kept)
        assert kept.waited and not t.limit(dropped) and t.limit(new)
        assert call.result(timeout=20).output.data
    finally:
        gate.set()
        t.close()
        shards.close()
