"""Tests for elasticmoe.placement's redundancy: every expert keeps min_copies (expert_copies) copies through losses,
scale-in and -out, full shards and random re-plans, whenever the slots allow."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.placement import Placement, plan
from tests.test_placement import E, check_invariants, zipf_load


@pytest.mark.parametrize("copies", [2, 3])
def test_min_copies_survive_loss_then_return_with_a_new_shard(copies):
    """Redundancy: a 3-shard placement with `copies` copies per expert loses a shard (re-home onto 2: at most 2
    copies fit), then a replacement joins (scale out): every expert has min(copies, shards) copies again, even with
    max_moves=0, because restoring redundancy is forced, like re-homing."""
    n, slots = 3, 64
    load = zipf_load(2, 1.0, seed=5)
    p = Placement.even(2, E, n, slots, copies)
    assert (p.num_copies() == copies).all()
    lost = plan(load, n - 1, slots, current=p.relabel([0, 2, 1]), max_moves=0, min_copies=copies)
    check_invariants(lost, load)
    assert (lost.num_copies() >= min(copies, n - 1)).all()
    back = plan(load, n, slots, current=lost, max_moves=0, min_copies=copies)
    check_invariants(back, load)
    assert (back.num_copies() >= copies).all()
    assert bool(back.experts_on(n - 1)) == (copies == 3)  # 2 copies still fit on 2 shards: nothing has to move
    again = plan(load, n, slots, current=back, max_moves=16, min_copies=copies)  # balancing moves keep the copies
    assert (again.num_copies() >= copies).all()
    assert (plan(load, n, slots, current=back, max_moves=0).num_copies() >= copies).all()  # nothing dropped


@pytest.mark.parametrize("max_moves", [None, 8])
def test_min_copies_kept_when_every_slot_is_full(max_moves):
    """Balancing moves on full shards evict only copies above min_copies: with 2 copies of every expert filling
    all slots no copy may give way, however hot expert 1 is (the floor holds over a whole run of moves)."""
    load = np.array([[1.0, 28.0, 1.0, 1.0, 5.0, 3.0]] * 2)
    current = Placement.even(2, 6, 4, 3, copies=2)  # 12 copies in 12 slots
    new = plan(load, 4, 3, current=current, max_moves=max_moves, min_copies=2)
    check_invariants(new, load)
    assert (new.num_copies() >= 2).all()


def test_min_copies_kept_over_random_replans():
    """Seeded random layouts and loads: re-plans of a placement with min_copies copies of every expert never drop
    one below it, whatever the slack of slots and the move budget."""
    rng = np.random.default_rng(11)
    for _ in range(30):
        experts, shards = int(rng.integers(4, 12)), int(rng.integers(2, 6))
        copies = int(rng.integers(2, shards + 1))
        slots = min(experts, -(-experts * copies // shards) + int(rng.integers(0, 3)))
        p = Placement.even(2, experts, shards, slots, copies)
        for _ in range(3):
            load = rng.zipf(1.5, size=(2, experts)).astype(float)
            p = plan(load, shards, slots, current=p, max_moves=int(rng.integers(0, 20)), min_copies=copies)
            check_invariants(p, load)
            assert (p.num_copies() >= copies).all()


def test_min_copies_from_scratch_and_when_slots_run_out():
    load = zipf_load(2, 1.2, seed=6)
    assert (plan(load, 4, 40, min_copies=2).num_copies() >= 2).all()
    tight = plan(load, 4, 16, min_copies=2)  # 64 slots for 64 experts: no room for a second copy
    check_invariants(tight, load)
    assert (tight.num_copies() == 1).all()
    with pytest.raises(ValueError, match="min_copies"):
        plan(load, 4, 40, min_copies=0)



def random_placement(rng: np.random.Generator, experts: int, shards: int, slots: int) -> Placement:
    """One layer: a copy of every expert on a random shard with room, then random extra copies (often every slot)."""
    holds = np.zeros((experts, shards), bool)
    for e in range(experts):
        holds[e, rng.choice(np.flatnonzero(holds.sum(0) < slots))] = True
    for _ in range(int(rng.integers(0, shards * slots + 1))):
        e = int(rng.integers(experts))
        room = np.flatnonzero((holds.sum(0) < slots) & ~holds[e])
        if len(room):
            holds[e, rng.choice(room)] = True
    return Placement.from_arrays((holds / holds.sum(1, keepdims=True))[None], holds[None], slots)


def test_min_copies_restored_by_evicting_surplus_copies():
    """Expert 2 has one copy and both shards without it are full, but expert 0's third copy can give way."""
    holds = np.array([[[1, 1, 1], [1, 1, 0], [0, 0, 1]]], bool)  # shards hold {0, 1}, {0, 1}, {0, 2}
    current = Placement.from_arrays(holds / holds.sum(2, keepdims=True), holds, 2)
    new = plan(np.array([[3.0, 2.0, 1.0]]), 3, 2, current=current, max_moves=0, min_copies=2)
    check_invariants(new, np.array([[3.0, 2.0, 1.0]]))
    assert new.num_copies().tolist() == [[2, 2, 2]]
    added, removed = current.diff(new)
    assert [(l, e) for l, e, _ in added] == [(0, 2)] and [(l, e) for l, e, _ in removed] == [(0, 0)]


def test_min_copies_restored_by_shifting_a_copy_to_a_free_slot():
    """Expert 2's only shard has the free slot: a copy of expert 0 or 1 moves there to make room for expert 2."""
    holds = np.array([[[1, 1, 0], [1, 1, 0], [0, 0, 1]]], bool)  # shards hold {0, 1}, {0, 1}, {2}
    current = Placement.from_arrays(holds / holds.sum(2, keepdims=True), holds, 2)
    load = np.array([[3.0, 2.0, 1.0]])
    new = plan(load, 3, 2, current=current, max_moves=0, min_copies=2)
    check_invariants(new, load)
    assert new.num_copies().tolist() == [[2, 2, 2]]
    added, removed = current.diff(new)
    [(_, f, u)] = removed
    assert f in (0, 1) and sorted((e, s) for _, e, s in added) == sorted([(f, 2), (2, u)])  # f: u -> 2, 2 onto u


def test_min_copies_reached_from_any_layout_whenever_slots_allow():
    """Property: from random layouts (random copy counts, full shards), a re-plan gives every expert
    min(min_copies, shards) copies whenever shards * slots >= copies * experts, also when shards are added or
    removed, and never takes an expert that had enough below it."""
    rng = np.random.default_rng(23)
    for case in range(300):
        experts, shards = int(rng.integers(1, 10)), int(rng.integers(1, 6))
        slots = int(rng.integers(-(-experts // shards), experts + 1))
        current = random_placement(rng, experts, shards, slots)
        new_shards = max(1, shards + int(rng.integers(-1, 2)))
        copies = int(rng.integers(1, new_shards + 1))
        new_slots = max(slots, -(-experts * copies // new_shards))
        load = rng.exponential(1.0, (1, experts)) * (rng.random((1, experts)) < 0.8)
        order = list(rng.permutation(shards))
        new = plan(load, new_shards, new_slots, current=current.relabel(order), max_moves=int(rng.integers(0, 6)),
                   min_copies=copies)
        check_invariants(new, load)
        assert (new.num_copies() >= copies).all(), (case, current.num_copies(), new.num_copies())
        fresh = plan(load, new_shards, new_slots, min_copies=copies)
        assert (fresh.num_copies() >= copies).all(), case


# ----- arguments and the data type


def test_top_up_adds_copies_only_on_the_targets():
    """fit.top_up (a re-home's shards still loading take the copies the live ones cannot): a free slot on a
    target first, else in place of a surplus copy there; never on another shard, never below k for the others."""
    from elasticmoe.placement.fit import top_up

    w = np.array([4.0, 3.0, 2.0, 1.0])
    mask = np.array([[1, 0, 0], [1, 0, 1], [1, 1, 1], [1, 1, 0]], bool)  # [E, N]: shard 0 full (4 slots)
    out, added = top_up(w, mask.copy(), np.array([False, False, True]), 2, 3)
    assert added == 1 and out[:, :2].tolist() == mask[:, :2].tolist()  # shard 1 had room: not a target
    assert out[0].tolist() == [True, False, True] and out[:, 2].sum() == 3  # expert 0 took target 2's free slot
    full, added = top_up(w, mask.copy(), np.array([False, False, True]), 2, 2)  # target 2 full: 2's surplus gives way
    assert added == 1 and full[0].tolist() == [True, False, True] and full[2].tolist() == [True, True, False]
    assert (full.sum(1) >= 2).all()
