"""Randomized properties of RoutingTable.assign: every (token, slot) goes to a live copy of its expert (never to an
excluded or absent shard), -1 only where none is left, and a replicated expert's tokens split by the live copies'
shares renormalised (evenly where they all carry 0), whatever the copies' order, the step and the exclusions."""

from __future__ import annotations

import numpy as np
import torch

from elasticmoe.gateway.routing import RoutingTable


def _random_table(rng: np.random.Generator, shards: int, experts: int) -> tuple[RoutingTable, dict]:
    """Layers 0 and 3 (model layer numbers), each expert on 0..shards shards in any order, shares that may be 0."""
    layers = {}
    for layer in (0, 3):
        row = []
        for _ in range(experts):
            c = int(rng.integers(0 if rng.random() < 0.1 else 1, shards + 1))
            where = rng.choice(shards, c, replace=False)
            share = rng.random(c) * (rng.random(c) < 0.8)
            share = share / share.sum() if share.sum() > 0 else share
            row.append([(int(s), float(x)) for s, x in zip(where, share)])
        layers[layer] = row
    table = RoutingTable.from_dict({"version": 1, "layers": layers,
                                    "shards": [{"id": f"s{i}", "address": f"127.0.0.1:{i}"} for i in range(shards)]})
    return table, layers


def test_tokens_go_to_live_copies_in_proportion_to_their_shares():
    rng = np.random.default_rng(11)
    checked = 0
    for case in range(100):
        shards, experts = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        table, layers = _random_table(rng, shards, experts)
        dead = frozenset(int(x) for x in rng.choice(shards, int(rng.integers(0, shards + 1)), replace=False))
        ids = torch.tensor(rng.integers(-1, experts, (2000, 2)))  # [T, k], -1: no expert
        step = int(rng.integers(0, 10_000))
        for layer, row in layers.items():
            got = table.assign(layer, ids, dead, step=step)  # [T, k]
            assert torch.equal(got, table.assign(layer, ids, dead, step=step))  # deterministic (failover re-splits)
            assert bool((got[ids < 0] == -1).all())
            for e, reps in enumerate(row):
                to = got[ids == e]
                live = [(s, x) for s, x in reps if s not in dead]
                if not live:
                    assert bool((to == -1).all()), (case, layer, e)
                    continue
                assert set(to.tolist()) <= {s for s, _ in live}, (case, layer, e, reps, dead)
                total = sum(x for _, x in live)
                if to.numel() >= 300:
                    for s, x in live:
                        want = x / total if total > 0 else 1 / len(live)
                        assert abs(float((to == s).double().mean()) - want) < 0.05, (case, layer, e, reps, dead)
                        checked += 1
    assert checked > 60  # the proportions were looked at, not only skipped


def test_a_lone_token_over_steps_follows_the_live_shares():
    """One token, one slot, 3,000 steps over random shares and exclusions: each live copy's part is its share."""
    rng = np.random.default_rng(12)
    for _ in range(20):
        shards = int(rng.integers(2, 6))
        share = rng.random(shards) * (rng.random(shards) < 0.8)
        share = share / share.sum() if share.sum() > 0 else share
        order = rng.permutation(shards)
        table = RoutingTable.from_dict({"version": 1, "layers": {0: [[(int(s), float(share[s])) for s in order]]},
                                        "shards": [{"id": f"s{i}", "address": "a"} for i in range(shards)]})
        dead = frozenset(int(x) for x in rng.choice(shards, int(rng.integers(0, shards)), replace=False))
        ids = torch.zeros(1, 1, dtype=torch.int64)
        got = torch.cat([table.assign(0, ids, dead, step=n) for n in range(1, 3001)]).flatten()
        live = [s for s in range(shards) if s not in dead]
        total = share[live].sum()
        for s in range(shards):
            want = 0.0 if s in dead else (share[s] / total if total > 0 else 1 / len(live))
            assert abs(float((got == s).double().mean()) - want) < 0.03, (share, dead, s)
