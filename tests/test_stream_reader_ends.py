"""However a stream's reader ends, the calls still pending on it fail at once (failover and hedging act then), not at
their deadlines: here gRPC's refusal of a frame over the shard's limit, read as the reader asks the shard's Health
again just as retain (the shard dropped from the table) closes the channel. Real in-process shard, plaintext; the
interleaving is held with threading.Event hooks."""

from __future__ import annotations

import threading
import time

import grpc

from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import is_oversize
from elasticmoe.rpc import frames
from tests.shard_util import E, T, Shards, _req, files  # noqa: F401
from tests.shard_util import gated_health

LIMIT = 4096  # the shard's message limit: a frame of T rows (hidden [T, H] float32) is over it


def test_a_refusal_read_as_retain_closes_the_channel_fails_the_call_at_once(files, monkeypatch):  # noqa: F811
    """The shard's limit not known yet (its Health held), a frame over it goes out and gRPC ends the stream
    (RESOURCE_EXHAUSTED, message larger than max); the reader asks Health again as retain closes the channel:
    gRPC refuses a call on a closed channel (ValueError), which killed the reader, and the call waited for its
    deadline (30 s). It now fails at once, OVERSIZE (the step splits its tokens anew). retain forgot the shard's
    limit (never known here): the refusal said "takes 0 bytes"; it now says the limit is not known, with gRPC's
    own words (the sizes)."""
    gate = gated_health(monkeypatch, "s0")
    shards = Shards(files, [list(range(E))], {0: {"max_message_bytes": LIMIT, "insecure": True}})
    layer, address = shards.layers[0], shards.addresses[0]
    assert len(frames.request_frame(1, _req(files, layer, rows=T))) > LIMIT
    t = StreamTransport(insecure=True)
    asking, go = threading.Event(), threading.Event()
    ask = t._ask_limit

    def held(address: str, stub, wait: bool = False) -> None:  # the reader's Health, asked again once retain has run
        if wait:
            asking.set()
            go.wait(10)
        ask(address, stub, wait)
    t._ask_limit = held
    try:
        call = t.send(address, lambda: _req(files, layer, rows=T), 30)
        assert asking.wait(10), "gRPC's refusal never came"
        t.retain([])  # the table dropped the shard: its stream half-closed, its channel closed
        go.set()
        t0 = time.monotonic()
        e = call.exception(timeout=20)  # it waited the call's deadline (30 s)
        assert time.monotonic() - t0 < 15  # at once; room for a loaded CI host
        assert isinstance(e, grpc.RpcError) and is_oversize(e), e
        assert "takes 0" not in e.details() and "limit not known" in e.details(), e.details()
        assert "larger than max" in e.details(), e.details()  # gRPC's words: both sizes
    finally:
        go.set()
        gate.set()
        t.close()
        shards.close()
