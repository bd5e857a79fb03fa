"""How a step uses its shards' answers, over real in-process shards: a `missing` answer names the experts a shard
lacks, and only those go elsewhere; compared with the single-process expert computation."""

from __future__ import annotations

import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from tests.shard_util import E, Shards, _inputs, _reference, _run, files, transport  # noqa: F401


def test_a_missing_answer_sends_only_the_missing_experts_elsewhere(files, transport):
    """s0 holds experts 0-3, s1 holds 4-7. The installed table (stale) still lists expert 4 on s0 alone; the newest
    one has it on s1. s0's call carries experts 0-4 and answers `missing` [4]: expert 4's tokens go to s1, and the
    others back to s0, their only copy (they were all kept off s0 for the step, which waited for a table that never
    moved experts 0-3 and failed after failover_s: 20 s here, against a 10 s bound with room for a loaded host)."""
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]])
    try:
        layer, inputs = shards.layers[0], _inputs(files, 9)
        ref = _reference(files, layer, *inputs)
        d = GrpcDispatcher(transport=transport, timeout_s=5, failover_s=20.0)
        d.set_table(shards.table({e: [0] if e <= 4 else [1] for e in range(E)}, version=1))
        assert d.set_table(shards.table({e: [0] if e < 4 else [1] for e in range(E)}, version=2))  # the next step's
        assert bool((inputs[1] == 4).any()) and bool((inputs[1] < 4).any())
        out, took = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers == 1 and took < 10.0, (d.failovers, took)
        assert not d.suspects and not d.fault_log  # a shard lacking an expert is alive: neither suspected nor dead
        d.close()
    finally:
        shards.close()
