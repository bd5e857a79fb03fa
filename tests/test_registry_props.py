"""Randomized properties of the controller's pure bookkeeping: the published table routes only to live shards and
says `complete` exactly when every expert has a live copy; commits keep positions distinct; the record round-trips
through JSON; the scale decider stays in bounds, honours its cool-down and warm-up and resumes its clocks."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch

from elasticmoe.autoscaler import policy
from elasticmoe.autoscaler.clocks import wall_minus_monotonic
from elasticmoe.autoscaler.policy import ScaleDecider
from elasticmoe.autoscaler.registry import Change, Registry
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.placement import plan
from tests.tracker_util import SteppedTime

MOE_LAYERS = [1, 3]


def _registry(rng: np.random.Generator) -> Registry:
    """A placement over n positions; each position held by a shard (ready or loading, healthy or not) or by none,
    plus a few spares."""
    experts, n = int(rng.integers(1, 9)), int(rng.integers(1, 6))
    slots = -(-experts // n) + int(rng.integers(0, 3))
    p = plan(rng.exponential(1.0, (len(MOE_LAYERS), experts)), n, slots, min_copies=int(rng.integers(1, 3)))
    reg = Registry(p, MOE_LAYERS, version=int(rng.integers(1, 50)))
    for i in range(n + int(rng.integers(0, 3))):
        if i < n and rng.random() < 0.15:
            continue  # an empty position
        info = reg.register(f"s{i}", f"127.0.0.1:{7000 + i}")
        info.ready, info.healthy = bool(rng.random() < 0.8), bool(rng.random() < 0.8)
    reg.overdue(float(rng.uniform(0, 100)), 1.0)
    return reg


def test_the_table_routes_only_to_live_shards_and_says_when_it_is_complete():
    rng = np.random.default_rng(21)
    for case in range(200):
        reg = _registry(rng)
        n = reg.placement.num_shards
        live = {s.shard_id: s.position for s in reg.shards.values() if s.ready and s.healthy and s.position < n}
        table = reg.table()
        assert [s["id"] for s in table["shards"]] == sorted(live, key=live.get)
        p = reg.placement
        for l, layer in enumerate(MOE_LAYERS):
            for e, reps in enumerate(table["layers"][layer]):
                want = [(s, x) for s, x in p.replicas(l, e) if s in live.values()]
                assert [(table["shards"][i]["position"], x) for i, x in reps] == want, case
        has_copy = [[any(s in live.values() for s, _ in reps) for reps in row] for row in p.layout]
        assert table["complete"] == all(map(all, has_copy)) == reg.complete(), case
        routing = RoutingTable.from_dict({**table, "epoch": "x"})
        ids = torch.arange(-1, p.num_experts).repeat(64, 1)  # [64, E + 1]
        for l, layer in enumerate(MOE_LAYERS):
            got = routing.assign(layer, ids, step=case)
            for e in range(p.num_experts):
                to = set(got[:, e + 1].tolist())
                assert to == {-1} if not has_copy[l][e] else -1 not in to, (case, l, e)
                assert {routing.shards[i] for i in to - {-1}} <= set(live), case


def test_commits_keep_positions_distinct_and_the_record_round_trips():
    """A random retire-and-replan (make-before-break's Change) commits to distinct positions: the kept shards on
    the new placement's positions, the removed ones gone, the spares after them. Each state's record, through
    JSON, restores the same placement, shards and start clocks with a newer version."""
    rng = np.random.default_rng(22)
    for case in range(150):
        reg = _registry(rng)
        _round_trip(reg)
        n = reg.placement.num_shards
        if n < 2:
            continue
        gone = sorted(int(x) for x in rng.choice(n, int(rng.integers(1, n)), replace=False))
        current, relabel = reg.retire(gone)
        experts = reg.placement.num_experts
        new = plan(rng.exponential(1.0, (len(MOE_LAYERS), experts)), n - len(gone),
                   max(reg.placement.slots_per_shard, -(-experts // (n - len(gone)))), current=current, max_moves=2)
        remove = tuple(s.shard_id for s in reg.shards.values() if s.position in gone)
        kept = {s.shard_id: relabel[s.position] for s in reg.shards.values() if s.position < n and
                s.shard_id not in remove}
        spares = sorted((s for s in reg.shards.values() if s.position >= n), key=lambda s: s.position)
        version = reg.version
        reg.commit(Change(current, new, relabel, remove=remove))
        assert reg.version == version + 1 and reg.placement is new
        assert not set(remove) & set(reg.shards)
        assert {sid: reg.shards[sid].position for sid in kept} == kept
        assert [s.position for s in spares] == list(range(new.num_shards, new.num_shards + len(spares)))
        positions = [s.position for s in reg.shards.values()]
        assert len(set(positions)) == len(positions), case
        assert set(reg.unstaffed) <= set(range(new.num_shards))
        _round_trip(reg)


def _round_trip(reg: Registry) -> None:
    back = Registry.restore(json.loads(json.dumps(reg.record())), MOE_LAYERS)
    assert back.placement == reg.placement and back.version == reg.version + 1
    fields = lambda r: {s.shard_id: (s.address, s.position, s.ready, s.healthy) for s in r.shards.values()}  # noqa
    assert fields(back) == fields(reg)
    assert back.unstaffed.keys() == reg.unstaffed.keys()
    # 10 ms: a clock not converted is off by the machine's uptime or the epoch; two offset readings agree to µs
    assert all(abs(back.unstaffed[p] - reg.unstaffed[p]) < 1e-2 for p in reg.unstaffed)
    assert back.table() == {**reg.table(), "version": reg.version + 1}


def test_the_clock_offset_ignores_a_reading_preempted_between_its_two_clocks():
    """A thread paused between time.time() and time.monotonic() (the CI failure: a restored start clock 1 ms off)
    gives a wide bracket; the narrowest of the readings is kept."""
    ticks = iter([10.0, 10.05, 11.0, 11.0 + 2e-6])  # monotonic: a 50 ms pause, then none
    walls = iter([5000.0, 5001.0])

    class Paused:
        monotonic = staticmethod(lambda: next(ticks))
        time = staticmethod(lambda: next(walls))

    assert abs(wall_minus_monotonic(Paused) - 4990.0) < 1e-5  # the first reading would give 4989.975
    assert abs(wall_minus_monotonic(time) - (time.time() - time.monotonic())) < 1e-2


def test_scale_decisions_stay_in_bounds_and_honour_cool_down_and_warm_up(monkeypatch):
    clock = SteppedTime()
    monkeypatch.setattr(policy, "time", clock)
    rng = np.random.default_rng(23)
    changes = scale_ins = 0
    for case in range(400):
        lo, target = int(rng.integers(1, 4)), float(rng.uniform(0.2, 0.9))
        hi, cool = lo + int(rng.integers(0, 6)), float(rng.choice([0.0, 5.0, 30.0]))
        d, current, last, warm_from = ScaleDecider(lo, hi, target, cool), int(rng.integers(lo, hi + 1)), -math.inf, None
        for _ in range(30):
            clock.now += float(rng.uniform(0, 10))
            if warm_from is None and rng.random() < 0.3:
                assert d.started() and not d.started()  # the first call only
                warm_from = clock.now + cool
            util = [float(rng.uniform(0, 1.2)) for _ in range(int(rng.integers(0, current + 2)))]
            want = d.desired(current, util)
            assert lo <= want <= hi, case
            if want != current:
                assert clock.now - last >= cool, case
                changes, last = changes + 1, clock.now
            if want < current:
                assert want == current - 1 and warm_from is not None and clock.now >= warm_from, case
                assert sum(util) / current < target / 2, case
                scale_ins += 1
            if want > current and want < hi:
                assert sum(util) / want <= target + 1e-9, case  # enough shards for the work at the target
            if util and sum(util) / len(util) > target and clock.now - last >= cool:
                assert want >= min(hi, math.ceil(sum(util) / target - 1e-9)), case  # not held back
            if rng.random() < 0.2:  # a restarted controller: the same clocks
                again = ScaleDecider(lo, hi, target, cool)
                again.resume(json.loads(json.dumps(d.state())))
                assert _close(again._last_change, d._last_change) and _close(again._scale_in_from, d._scale_in_from)
                d = again
            current = want
    assert changes > 100 and scale_ins > 20


def _close(a: float, b: float) -> bool:
    return a == b or abs(a - b) < 1e-3
