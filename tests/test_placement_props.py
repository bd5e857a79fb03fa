"""Randomized properties of the planner: slots, copies, move budgets and min_gain over sequences of re-plans (load
drift, scale out, scale in of any shard, slot changes), exact min-max shares, and hot experts keeping their copies."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from elasticmoe.placement import Placement, plan
from elasticmoe.placement.flow import balance, min_max, shares
from elasticmoe.placement.search import key

PROPS = settings(max_examples=int(os.environ.get("ELASTICMOE_PLACEMENT_EXAMPLES", "60")), deadline=None,
                 derandomize=True, suppress_health_check=list(HealthCheck))
LOADS = st.sampled_from([0.0, 1e-9, 0.5, 1.0, 3.0, 40.0, 1e4, 1e9])  # zeros, ties and a wide range


def _load(data, layers: int, experts: int) -> np.ndarray:
    return np.array([[data.draw(LOADS) for _ in range(experts)] for _ in range(layers)])  # [L, E]


def _check(p: Placement, load: np.ndarray, shards: int, slots: int, k: int) -> None:
    """Valid (a copy of every expert, <= slots copies per shard and layer, shares >= 0 summing to 1), and at least
    min(k, shards) copies of every expert whenever the slots allow."""
    p.validate()
    assert (p.num_shards, p.slots_per_shard) == (shards, slots)
    holds = p.holds()  # [L, E, N]
    assert holds.any(2).all() and (holds.sum(1) <= slots).all()
    want = min(k, shards)
    if shards * slots >= want * p.num_experts:
        assert (p.num_copies() >= want).all(), p.num_copies()
    np.testing.assert_allclose(p.shard_load(load).sum(1), load.sum(1), rtol=1e-9, atol=1e-6)


def _reshared(p: Placement, load: np.ndarray) -> np.ndarray:
    """[L] balancedness of p's copies at their optimal shares (a re-plan gets these without moving a weight)."""
    holds = p.holds()
    best = np.stack([shares(row, holds[l]) for l, row in enumerate(load)])
    return Placement.from_arrays(best, holds, p.slots_per_shard).balancedness(load)


@PROPS
@given(data=st.data())
def test_every_plan_of_a_random_sequence_is_valid_and_keeps_min_copies(data):
    """From scratch, then re-plans on new loads with the shard count going up and down (any shard retired) and the
    slots changing: every plan places every expert within the slots, with min_copies where they fit. On the same
    shape, a re-plan adds at most max_moves copies, only in layers it lifts by >= min_gain."""
    layers, experts = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 9))
    shards, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    slots = data.draw(st.integers(-(-experts // shards), experts + 1))
    load = _load(data, layers, experts)
    p = plan(load, shards, slots, min_copies=k)
    _check(p, load, shards, slots, k)
    for _ in range(3):
        new_shards = data.draw(st.integers(1, 7))
        new_slots = data.draw(st.integers(-(-experts // new_shards), experts + 1))
        order = data.draw(st.permutations(range(shards)))  # the last shards - new_shards positions are retired
        budget, min_gain = data.draw(st.integers(0, 5)), data.draw(st.sampled_from([0.0, 0.02, 0.3]))
        load = _load(data, layers, experts)
        cur = p.relabel(order)
        q = plan(load, new_shards, new_slots, current=cur, max_moves=budget, min_gain=min_gain, min_copies=k)
        note(f"{shards}x{slots} -> {new_shards}x{new_slots}, budget {budget}, min_gain {min_gain}")
        _check(q, load, new_shards, new_slots, k)
        assert q.version == p.version + 1
        if (new_shards, new_slots) == (shards, slots) and (p.num_copies() >= min(k, shards)).all():
            added = cur.diff(q)[0]
            assert len(added) <= budget  # nothing forced: every move is one the budget pays for
            gain = q.balancedness(load) - _reshared(cur, load)
            for l in {l for l, _, _ in added}:
                assert gain[l] >= min_gain - 1e-9 and gain[l] > 0, (l, gain[l], min_gain)
        p, shards, slots = q, new_shards, new_slots


@PROPS
@given(data=st.data())
def test_a_re_plan_pays_for_its_moves(data):
    """On the same shards and slots, a re-plan on a new load adds at most max_moves copies, and only in layers that
    they lift by >= min_gain over what new shares alone give (moving weights costs; re-sharing is free)."""
    layers, experts, shards = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 12)), data.draw(st.integers(2, 6))
    slots = data.draw(st.integers(-(-experts // shards), experts + 1))
    p = plan(_load(data, layers, experts), shards, slots)
    smooth = st.lists(st.lists(st.integers(0, 30), min_size=experts, max_size=experts), min_size=layers,
                      max_size=layers)
    load = np.array(data.draw(smooth), float) if data.draw(st.booleans()) else _load(data, layers, experts)  # [L, E]
    budget = data.draw(st.sampled_from([0, 1, 1, 2, 12]))  # one move: each run's gain is that move's
    min_gain = data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    q = plan(load, shards, slots, current=p, max_moves=budget, min_gain=min_gain)
    _check(q, load, shards, slots, 1)
    added = p.diff(q)[0]
    assert len(added) <= budget
    gain = q.balancedness(load) - _reshared(p, load)
    assert (gain >= -1e-9).all()  # never worse than re-sharing alone
    for l in {l for l, _, _ in added}:
        assert gain[l] >= min_gain - 1e-9 and gain[l] > 0, (l, gain[l], min_gain)


@PROPS
@given(data=st.data())
def test_scale_in_re_homes_every_copy_of_the_retired_shard_and_forces_only_orphans(data):
    """Retiring any one shard with no move budget: nothing stays on it, and the copies made are exactly one per
    expert it held alone (forced moves, made although max_moves = 0)."""
    layers, experts, shards = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 9)), data.draw(st.integers(2, 6))
    slots = data.draw(st.integers(-(-experts // (shards - 1)), experts + 1))
    load = _load(data, layers, experts)
    p = plan(load, shards, slots)
    gone = data.draw(st.integers(0, shards - 1))
    cur = p.relabel([s for s in range(shards) if s != gone] + [gone])
    q = plan(load, shards - 1, slots, current=cur, max_moves=0)
    _check(q, load, shards - 1, slots, 1)
    added, removed = cur.diff(q)
    assert {(l, e) for l, e, s in removed if s == shards - 1} == set(p.experts_on(gone))
    orphans = {(l, e) for l, e in p.experts_on(gone) if p.copies(l, e) == 1}
    assert sorted((l, e) for l, e, _ in added) == sorted(orphans)


@PROPS
@given(data=st.data())
def test_a_balanced_layer_is_left_alone(data):
    """A re-plan on the load a from-scratch plan was made for (or any load) adds no copy in a layer that its shares
    alone already balance within min_gain."""
    layers, experts, shards = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9)), data.draw(st.integers(1, 6))
    slots = data.draw(st.integers(-(-experts // shards), experts + 1))
    load = _load(data, layers, experts)
    p = plan(load, shards, slots)
    if data.draw(st.booleans()):
        load = _load(data, layers, experts)
    min_gain = data.draw(st.sampled_from([0.0, 0.02, 0.3]))
    q = plan(load, shards, slots, current=p, max_moves=data.draw(st.integers(0, 8)), min_gain=min_gain)
    calm = _reshared(p, load) >= 1.0 - max(min_gain, 1e-9)
    assert not [x for x in p.diff(q)[0] if calm[x[0]]]
    assert not [x for x in p.diff(q)[1] if calm[x[0]]]
    if calm.all():
        assert p.diff(q) == ([], [])


@PROPS
@given(data=st.data())
def test_a_hotter_expert_never_loses_copies(data):
    """An expert whose load grows (the rest unchanged) keeps at least the copies it had."""
    experts, shards, k = data.draw(st.integers(2, 9)), data.draw(st.integers(2, 7)), data.draw(st.integers(1, 2))
    slots = data.draw(st.integers(-(-experts * min(k, shards) // shards), experts + 1))
    load = _load(data, 1, experts)
    p = plan(load, shards, slots, min_copies=k)
    e = data.draw(st.integers(0, experts - 1))
    hot = load.copy()
    hot[0, e] = hot[0, e] * data.draw(st.sampled_from([1.5, 4.0, 100.0])) + data.draw(LOADS)
    q = plan(hot, shards, slots, current=p, max_moves=data.draw(st.integers(0, 8)), min_copies=k)
    assert q.copies(0, e) >= p.copies(0, e)


def _densest(w: np.ndarray, mask: np.ndarray) -> float:
    """The lowest possible max shard load: max over shard subsets of the tokens that must land inside / its size."""
    n, best = mask.shape[1], 0.0
    for sub in range(1, 1 << n):
        inside = ((sub >> np.arange(n)) & 1).astype(bool)
        best = max(best, float(w[~(mask & ~inside).any(1)].sum()) / int(inside.sum()))
    return best


def test_shares_reach_the_lowest_possible_max_shard_load():
    """On random layouts (up to 12 shards: both scorers), min_max, balance, key and shares all reach the exact
    min-max level, with flows that conserve every expert's tokens and use only its copies."""
    rng = np.random.default_rng(5)
    for case in range(150):
        experts, n = int(rng.integers(1, 9)), int(rng.integers(1, 13))
        mask = rng.random((experts, n)) < rng.uniform(0.1, 0.7)
        mask[np.arange(experts), rng.integers(0, n, experts)] = True
        w = rng.exponential(1.0, experts) * (rng.random(experts) < 0.85) * 10 ** rng.uniform(-3, 6)
        best, tol = _densest(w, mask), 1e-6 * max(w.sum(), 1e-12)
        assert abs(min_max(w, mask)[0] - best) <= tol, case
        flow = balance(w, mask)[0]  # [E, N]
        assert np.abs(flow.sum(1) - w).max() <= tol and (flow[~mask] == 0).all() and (flow >= -tol).all()
        assert abs(flow.sum(0).max() - best) <= tol and abs(key(w, mask).level - best) <= tol, case
        split = shares(w, mask)
        np.testing.assert_allclose(split.sum(1), 1.0, atol=1e-9)
        assert abs((w @ split).max() - best) <= tol, case


def test_even_placements_fit_their_slots():
    """Placement.even accepts exactly the layouts that fit (num_shards * slots >= experts * copies) and each one
    it builds is valid: every expert on `copies` distinct shards, no shard over its slots."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        experts, n = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        copies = int(rng.integers(1, n + 1))
        slots = -(-experts * copies // n) + int(rng.integers(0, 2))
        p = Placement.even(int(rng.integers(1, 3)), experts, n, slots, copies)
        p.validate()
        assert (p.num_copies() == copies).all()
