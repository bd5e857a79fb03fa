"""The stream transport's frames that gRPC has not taken yet (a shard slow to read: gRPC sends one frame at a time,
within the stream's flow-control window) are bounded by count and bytes, as the socket transport's unsent frames:
past the bound a call fails at once as busy, and those queued are still answered. They were unbounded: every call to a
shard that reads nothing queued its frame, past its deadline too (the stream stays open), for as long as the shard's
process answered gRPC's pings. Real in-process shard whose calls sleep (a straggler), real 1 MiB frames."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.gateway import stream_transport
from elasticmoe.gateway.stream_transport import StreamTransport
from elasticmoe.gateway.transport import is_busy
from elasticmoe.rpc import frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from tests.shard_util import E, Shards, _reference, files  # noqa: F401

ROWS = 4096  # hidden [ROWS, 64] float32: 1 MiB a frame
SENT = 100  # far more than the shard's window and the socket's buffers take while it sleeps


def _frame(files, layer: int) -> ExpertRequest:  # noqa: F811
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(ROWS)]).to(torch.int32)  # [T, 2]
    return ExpertRequest(layer, torch.randn(ROWS, files.spec.hidden_size, generator=g), ids,
                         torch.rand(ROWS, 2, generator=g))


@pytest.mark.parametrize("bound", ["frames", "bytes", "bytes-below-one-frame"])
def test_frames_a_slow_shard_has_not_taken_are_bounded_and_those_queued_are_answered(files, bound, monkeypatch):
    frame_bytes = len(frames.request_frame(1, _frame(files, 0)))
    most = {"frames": 8, "bytes": 5, "bytes-below-one-frame": 1}[bound]  # frames queued at most
    if bound == "frames":
        monkeypatch.setattr(stream_transport, "QUEUE_FRAMES", most)
    else:
        monkeypatch.setattr(stream_transport, "QUEUE_BYTES", most * frame_bytes + frame_bytes // 2 if most > 1 else
                            frame_bytes // 2)  # one larger frame alone still goes
    shards = Shards(files, [list(range(E))])
    t = StreamTransport()
    try:
        layer, address = shards.layers[0], shards.addresses[0]
        req = _frame(files, layer)
        assert t.send(address, lambda: req, 30).result(timeout=30).output is not None  # the stream is open
        shards.servicers[0].faults.run_delay_s = 1.0  # a straggler: it reads its next frame a second after each
        calls, queued = [], []
        for _ in range(SENT):
            calls.append(t.send(address, lambda: req, 60))
            stream = t._streams[address]
            queued.append((stream.queued, len(stream._out), stream.queued_bytes))
        assert max(q[1] for q in queued) <= most and max(q[0] for q in queued) <= most, queued  # it held ~80
        assert max(q[2] for q in queued) <= max(stream_transport.QUEUE_BYTES, frame_bytes), queued
        refused = [c for c in calls if c.done() and c.exception() is not None]
        assert len(refused) >= SENT - most - 40 and all(is_busy(c.exception()) for c in refused), len(refused)
        assert refused[0].exception().details().startswith(f"{frames.BUSY}: the stream to {address} has not taken")
        shards.servicers[0].faults.run_delay_s = 0.0
        want = _reference(files, layer, req.hidden, req.topk_ids, req.topk_weights).to(torch.float64)
        answered = [c for c in calls if c not in refused]
        for c in answered:  # every frame queued is sent and answered
            torch.testing.assert_close(decode_tensor(c.result(timeout=60).output), want)
        assert len(answered) + len(refused) == SENT and t._streams[address].queued == 0
    finally:
        shards.servicers[0].faults.run_delay_s = 0.0
        t.close()
        shards.close()

