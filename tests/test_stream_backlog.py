"""A RunExpertsStream's answers not yet sent on are bounded in bytes as well as in count: a client that reads none
holds the shard to max_stream_reply_bytes of them (it held 32, whatever their size: 32 answers of max_message_bytes,
8 GiB by default, per stream), and an answer larger than the bound alone still goes. Real in-process shard, real
4 MiB answers."""

from __future__ import annotations

import time

import pytest
import torch

from elasticmoe.gateway.stream_transport import STREAM_METHOD
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.codec import channel_options, decode_tensor
from tests.shard_util import E, Shards, files  # noqa: F401

ROWS = 8192  # an answer: float64 [ROWS, 64], 4 MiB
WINDOW = 16 << 20  # the client's HTTP/2 receive window (options.HTTP2_OPTIONS' lookahead_bytes)


def _stalled(servicer) -> int:
    """servicer.calls once the shard has taken no frame for a second."""
    last, still = -1, 0.0
    while still < 1.0:
        time.sleep(0.1)
        still, last = (still + 0.1, last) if servicer.calls == last else (0.0, servicer.calls)
    return last


@pytest.mark.parametrize("limit", [8 << 20, 1 << 20], ids=["two-answers", "less-than-one"])
def test_a_client_reading_nothing_holds_the_shard_to_the_byte_bound(files, limit):  # noqa: F811
    shards = Shards(files, [list(range(E))], {0: {"max_stream_reply_bytes": limit}})
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(ROWS, files.spec.hidden_size, generator=g)  # [T, H]
    ids = torch.randint(0, E, (ROWS, 2), generator=g, dtype=torch.int32)  # [T, k]
    frame = frames.encode_request(1, shards.layers[0], hidden, ids, torch.rand(ROWS, 2, generator=g))
    answer = ROWS * files.spec.hidden_size * 8
    sent = 60
    channel = tls.channel(shards.addresses[0], channel_options())
    try:
        call = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=frames.decode_reply)
        replies = call(iter([frame] * sent), timeout=120)
        servicer = shards.servicers[0]
        assert servicer.max_stream_replies == 32 and answer * 32 > 8 * limit  # the count alone would allow far more
        computed = _stalled(servicer)
        held = max(1, limit // answer)  # the backlog's answers (one alone always goes)
        # the client's window (twice, for what gRPC and TCP hold besides), the backlog, one waiting to enter it
        assert computed <= 2 * WINDOW // answer + held + 2, (computed, held)
        got = [decode_tensor(r.output) for r in replies]  # reading: every answer comes
        assert len(got) == sent and all(o.shape == (ROWS, files.spec.hidden_size) for o in got)
        assert all(torch.equal(o, got[0]) for o in got) and servicer.calls == sent
    finally:
        channel.close()
        shards.close()
