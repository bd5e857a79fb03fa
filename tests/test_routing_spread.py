"""How a replicated expert's tokens spread over its copies: in proportion to the copies' shares within a batch, and
from engine step to engine step for a batch of one token (the decode of a lone request), over real shards too."""

from __future__ import annotations

import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from tests.shard_util import E, _inputs, _reference, _run, files, pair  # noqa: F401


def _table(shares: list[float]) -> RoutingTable:
    """One layer, one expert with a copy on each shard at the given shares."""
    return RoutingTable.from_dict({"version": 1, "layers": {0: [list(enumerate(shares))]},
                                   "shards": [{"id": f"s{i}", "address": f"127.0.0.1:{i}"}
                                              for i in range(len(shares))]})


def test_a_lone_token_spreads_over_the_copies_by_their_shares_across_steps():
    """One token choosing the expert in each of 2 slots, 2,000 steps: each copy's part is its share (it was 1.0
    and 0.0 when every step put the lone token at the same point)."""
    for shares in ([0.6, 0.4], [0.5, 0.25, 0.25], [0.9, 0.1]):
        table, ids = _table(shares), torch.zeros(1, 2, dtype=torch.int64)  # [T=1, k=2]
        got = torch.cat([table.assign(0, ids, step=n) for n in range(1, 2001)]).flatten()
        part = torch.bincount(got, minlength=len(shares)).double() / got.numel()
        torch.testing.assert_close(part, torch.tensor(shares, dtype=torch.float64), atol=0.02, rtol=0)


def test_the_same_step_routes_the_same_way_and_failover_keeps_the_step():
    """Deterministic per (row, slot, step): asking again (a re-split inside the step) gives the same copies; a dead
    copy's tokens go to the live one whatever the step."""
    table, ids = _table([0.5, 0.5]), torch.zeros(8, 2, dtype=torch.int64)  # [T, k]
    for n in (0, 1, 7, 12345):
        assert torch.equal(table.assign(0, ids, step=n), table.assign(0, ids, step=n))
        assert bool((table.assign(0, ids, frozenset({0}), step=n) == 1).all())


def test_a_lone_request_uses_both_copies_and_equals_the_single_process(files, pair):  # noqa: F811
    """Two real shards holding every expert at shares 0.7 / 0.3, 40 steps of one token through the dispatcher (the
    engine's begin_step before each): both shards take tokens (the second took none when every step put the lone
    token's slots at the same points, 0 and 0.5), and every output equals the single-process one."""
    layer = pair.layers[0]
    hidden, ids, weights = _inputs(files)
    one = (hidden[:1], ids[:1], weights[:1])  # [1, H], [1, k], [1, k]
    ref = _reference(files, layer, *one)
    d = GrpcDispatcher(transport="socket", timeout_s=5)
    try:
        d.set_table(RoutingTable.from_dict({
            "version": 1, "layers": {l: [[(0, 0.7), (1, 0.3)]] * E for l in pair.layers},
            "shards": [{"id": f"s{i}", "address": a} for i, a in enumerate(pair.addresses)]}))
        for _ in range(40):
            d.begin_step()
            out, _ = _run(d, layer, one)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert len(d.shard_tokens) == 2 and min(d.shard_tokens.values()) >= 5, d.shard_tokens
    finally:
        d.close()
