"""Failover decisions without Ray: routing around dead copies, the dispatcher's in-step failover and hedging over
real in-process gRPC shards, compared with the single-process expert computation."""

from __future__ import annotations

import itertools
import sys
import threading
import time

import pytest
import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.model.dispatch import ExpertsUnavailable
from tests.shard_util import (ALL_BOTH, E, K, SPLIT, T, Shards, _inputs, _reference, _run, files,  # noqa: F401
                              pair, transport)


# ----- RoutingTable.assign: every combination of 1-3 copies on 4 shards and every set of dead shards
def _table(experts: list[list[tuple[int, float]]], n: int = 4) -> RoutingTable:
    return RoutingTable.from_dict({"version": 1, "layers": {0: experts},
                                   "shards": [{"id": f"s{i}", "address": f"127.0.0.1:{i}"} for i in range(n)]})


def _placements():
    for copies in (1, 2, 3):
        for shards in itertools.combinations(range(4), copies):
            for shares in ([1.0 / copies] * copies, [0.7, 0.3, 0.0][:copies] if copies > 1 else [1.0],
                           [0.0] * copies):
                yield list(zip(shards, shares))


@pytest.mark.parametrize("dead", [frozenset(d) for r in range(5) for d in itertools.combinations(range(4), r)],
                         ids=lambda d: "dead" + "".join(map(str, sorted(d))) if d else "none")
def test_assign_picks_a_live_copy_iff_one_exists(dead):
    ids = torch.zeros((400, 1), dtype=torch.int64)  # every token to expert 0
    ids[::7] = -1
    for reps in _placements():
        table = _table([reps] + [[(0, 1.0)]] * (E - 1))
        shard = table.assign(0, ids, exclude=dead)
        live = [s for s, _ in reps if s not in dead]
        assert bool((shard[ids < 0] == -1).all())
        got = shard[ids >= 0]
        if not live:
            assert bool((got == -1).all()), (reps, dead)
            continue
        assert set(got.tolist()) <= set(live), (reps, dead, got.unique())
        weights = {s: x for s, x in reps if s in live}
        total = sum(weights.values())
        for s in live:  # shares renormalised over the live copies (even when they all carry 0)
            want = weights[s] / total if total > 0 else 1 / len(live)
            assert abs(float((got == s).float().mean()) - want) < 0.05, (reps, dead, s)


def test_assign_plans_are_per_exclusion_and_answers_are_fresh():
    """assign caches each (layer, exclusion)'s plan: interleaved exclusions keep their own answers, and an answer
    written to by its caller leaves the next one unchanged (single-copy and split layers alike)."""
    ids = torch.arange(T * K).reshape(T, K) % E
    ids[0, 0] = -1
    for reps in ([(1, 1.0)], [(0, 0.5), (2, 0.5)]):
        table = _table([reps] + [[(e % 4, 1.0)] for e in range(1, E)])
        first = {d: table.assign(0, ids, exclude=frozenset(d)) for d in ((), (1,), (0, 2), (3,))}
        for d, want in first.items():
            got = table.assign(0, ids, exclude=frozenset(d))
            assert torch.equal(got, want), (reps, d)
            got.fill_(7)
            assert torch.equal(table.assign(0, ids, exclude=frozenset(d)), want), (reps, d)
        assert int(first[()][0, 0]) == -1 and bool((first[(1,)][ids % 4 == 1] == -1).all())


def test_assign_failover_to_the_higher_numbered_copy():
    table = _table([[(0, 0.5), (1, 0.5)]] * E, n=2)
    ids = torch.arange(E).repeat(T // E + 1)[:T].reshape(-1, 1)
    assert set(table.assign(0, ids).tolist()[0]) <= {0, 1}
    assert bool((table.assign(0, ids, exclude=frozenset({0})) == 1).all())
    assert bool((table.assign(0, ids, exclude=frozenset({1})) == 0).all())
    assert bool((table.assign(0, ids, exclude=frozenset({0, 1})) == -1).all())


def test_hedge_delay_follows_the_median_round_trip_recomputed_every_few_calls():
    """hedge_after_s: hedge_factor x the median of the recent round trips, at least hedge_min_s, 1 s before any; each
    of the first HEDGE_MEDIAN_EVERY round trips counts at once, later the median is refreshed every
    HEDGE_MEDIAN_EVERY round trips (not sorted again at each check)."""
    from elasticmoe.gateway.dispatcher import HEDGE_MEDIAN_EVERY

    d = GrpcDispatcher(hedge_min_s=0.05, hedge_factor=4.0, insecure=True)
    try:
        assert d.hedge_after_s() == 1.0  # nothing measured yet
        d.note_latency(0.5)  # a cold first call
        assert d.hedge_after_s() == pytest.approx(2.0)
        for _ in range(2):
            d.note_latency(0.1)
        assert d.hedge_after_s() == pytest.approx(0.4)  # the first round trips each count at once
        for _ in range(HEDGE_MEDIAN_EVERY - 3):
            d.note_latency(0.1)
        changes, last = [], d.hedge_after_s()
        for n in range(3 * HEDGE_MEDIAN_EVERY):  # then fast ones, checked after each
            d.note_latency(0.001)
            if (now := d.hedge_after_s()) != last:
                changes.append(n)
                last = now
        assert last == 0.05 and changes, changes  # median 1 ms: 4 ms, below the floor
        assert all(b - a >= HEDGE_MEDIAN_EVERY for a, b in zip(changes, changes[1:])), changes  # refreshed in steps
        for _ in range(5 * HEDGE_MEDIAN_EVERY):
            d.note_latency(0.5)
        assert d.hedge_after_s() == pytest.approx(2.0)
    finally:
        d.close()


def test_a_shard_failing_on_two_threads_at_once_is_reported_once():
    """Two threads report the same shard's failure at once (the engine's step and a hedged-around call's callback):
    the first is held between its check of the reports in progress and its add (sys.settrace, no code replaced)
    while the second reports; the controller hears of the shard once."""
    from tests.test_transport_frames import _pause_at

    heard, release = [], threading.Event()

    def on_failure(shard_id):  # the report in progress until the test has counted
        heard.append(shard_id)
        release.wait(10)

    d = GrpcDispatcher(transport="unary", on_failure=on_failure)
    paused, go = threading.Event(), threading.Event()

    def held():
        sys.settrace(_pause_at(GrpcDispatcher.suspect, "self._reporting.add(shard_id)", paused, go))
        try:
            d.suspect("s0", report=True)
        finally:
            sys.settrace(None)
    first = threading.Thread(target=held)
    first.start()
    try:
        assert paused.wait(10)
        second = threading.Thread(target=d.suspect, args=("s0", True))
        second.start()
        second.join(0.5)  # it reports while the first is held (or waits for it)
        go.set()
        first.join(10)
        second.join(10)
        deadline = time.monotonic() + 5
        while not heard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heard + list(d._reports.queue) == ["s0"]  # told once; nothing else waiting to be told
    finally:
        go.set()
        release.set()
        d.close()


# ----- the dispatcher over real gRPC shards
def test_dispatch_equals_single_process(files, pair, transport):
    layer = pair.layers[0]
    inputs = _inputs(files)
    ref = _reference(files, layer, *inputs)
    for copies in (SPLIT, ALL_BOTH):
        d = GrpcDispatcher(transport=transport, timeout_s=5)
        d.set_table(pair.table(copies))
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.failovers == 0 and d.hedges == 0


def test_dead_copy_fails_over_inside_the_step(files, pair, transport):
    layer, inputs = pair.layers[0], _inputs(files, 1)
    ref = _reference(files, layer, *inputs)
    reported: list[str] = []
    d = GrpcDispatcher(transport=transport, timeout_s=5, on_failure=lambda sid: reported.append(sid))
    d.set_table(pair.table(ALL_BOTH))
    pair.servers[0].stop(None)
    out, _ = _run(d, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.failovers >= 1
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported == ["s0"]  # reported once, from the report thread
    d.failovers = 0
    out, _ = _run(d, layer, inputs)  # the next step avoids the suspect: no failover at all
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.failovers == 0


def test_straggler_is_hedged_and_the_first_answer_wins(files, pair, transport):
    layer, inputs = pair.layers[0], _inputs(files, 2)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=10, hedge_min_s=1.0)
    d.set_table(pair.table(ALL_BOTH))
    for _ in range(5):
        _run(d, layer, inputs)  # round-trip samples for the hedge threshold
    pair.servicers[0].faults.run_delay_s = 4.0
    out, took = _run(d, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.hedges >= 1 and took < 3.0, (d.hedges, took)
    assert "s0" in d.suspects
    (entry,) = [f for f in d.fault_log if f["straggled"]]
    assert entry["straggled"] == ["s0"] and not entry["dead"] and 1.0 <= entry["detected_s"] <= entry["done_s"]
    # the hedge's answer (an idle in-process shard: milliseconds, more on a loaded machine) ends the step, not
    # another hedge delay's wait (1 s)
    assert entry["done_s"] - entry["detected_s"] < 0.8, entry


def test_a_shard_owing_a_hedged_around_answer_is_not_probed_again(files, pair, transport):
    """A shard paused for longer than suspect_s is not sent the next step's calls (each would straggle for a hedge
    delay again) until it has answered the call that was hedged around; then it takes its share again."""
    layer, inputs = pair.layers[0], _inputs(files, 4)
    ref = _reference(files, layer, *inputs)
    # a hedge delay of 1 s: on a loaded machine calls of 0.2 s are hedged too (CI beside the e2e suite)
    d = GrpcDispatcher(transport=transport, timeout_s=10, hedge_min_s=1.0, suspect_s=0.1)
    d.set_table(pair.table(ALL_BOTH))
    for _ in range(5):
        _run(d, layer, inputs)
    pair.servicers[0].faults.run_delay_s = 4.0
    _run(d, layer, inputs)
    assert d.hedges == 1
    time.sleep(0.3)  # the suspicion period has passed; the straggling call has not answered (4 s)
    before = d.shard_tokens.get("s0", 0)
    out, took = _run(d, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # not sent to s0 (no hedge, none of its tokens), so not waiting for it (4 s, or a hedge delay and a hedge); the
    # counts, not a time under the hedge delay, are the proof
    assert d.hedges == 1 and took < 3.0 and d.shard_tokens.get("s0", 0) == before, (d.hedges, took)
    pair.servicers[0].faults.run_delay_s = 0.0
    deadline = time.monotonic() + 15
    while d.shard_tokens.get("s0", 0) == before and time.monotonic() < deadline:
        _run(d, layer, inputs)  # once the straggler has answered, s0 takes calls again
        time.sleep(0.05)
    # (no count of hedges here: a call of these steps slower than the hedge delay on a loaded machine is hedged)
    assert d.shard_tokens.get("s0", 0) > before, d.shard_tokens


def test_a_slow_step_beside_a_stuck_shard_hedges_nothing_and_costs_no_later_step(files, pair, transport):
    """s0 is paused and owes a hedged-around answer; then s1, the other copy, is slow for one step (a busy host).
    That step waits for s1: its hedge would go to s0, which does not answer, and would put s1 under suspicion, so
    that the next steps fell back to both copies and paid a hedge delay each (the served fault test saw 9 hedged
    steps in 2.3 s of an 8 s pause on a loaded CI host). The later steps go to s1 alone, unhedged. A recently
    suspected s1 is still chosen before the stuck s0."""
    layer, inputs = pair.layers[0], _inputs(files, 5)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=20, hedge_min_s=1.0)
    d.set_table(pair.table(ALL_BOTH))
    for _ in range(5):
        _run(d, layer, inputs)
    pair.servicers[0].faults.run_delay_s = 15.0
    _run(d, layer, inputs)
    assert d.hedges == 1 and d.stuck() == {"s0"}, (d.hedges, d.stuck())
    s0 = d.shard_tokens.get("s0", 0)
    pair.servicers[1].faults.run_delay_s = 2.5  # past the hedge delay (1 s)
    out, took = _run(d, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.hedges == 1 and d.shard_tokens.get("s0", 0) == s0 and took >= 2.5, (d.hedges, d.shard_tokens, took)
    assert "s1" not in d.suspects or time.monotonic() - d.suspects["s1"] > d.suspect_s, d.suspects
    pair.servicers[1].faults.run_delay_s = 0.0
    d.suspect("s1", report=False)  # s1 failed or straggled just now: still before s0, which owes an answer
    for _ in range(3):
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.hedges == 1 and d.shard_tokens.get("s0", 0) == s0, (d.hedges, d.shard_tokens)
    pair.servicers[0].faults.run_delay_s = 0.0


def test_a_hedged_around_call_that_then_breaks_is_reported(files, pair, transport):
    """A straggler's hedge wins the step; when the straggler's connection then breaks (its shard died, it was not
    just slow), the failure is reported to the controller at once, not when the suspicion expires."""
    layer, inputs = pair.layers[0], _inputs(files, 3)
    reported: list[str] = []
    d = GrpcDispatcher(transport=transport, timeout_s=10, hedge_min_s=0.05, on_failure=lambda sid: reported.append(sid))
    d.set_table(pair.table(ALL_BOTH))
    for _ in range(5):
        _run(d, layer, inputs)
    pair.servicers[0].faults.run_delay_s = 3.0
    _run(d, layer, inputs)
    assert d.hedges >= 1 and reported == [] and d.failovers == 0  # the hedge won; nothing failed yet
    pair.servers[0].stop(None)  # the straggler's connection breaks: its pending call ends UNAVAILABLE
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reported == ["s0"]


def test_a_re_sent_calls_latency_is_measured_from_its_send(files, pair, transport):
    """The round trip fed to the hedging median is each call's own, from its send: a call re-sent after its first
    copy ran out its deadline (2 s) is noted at its own milliseconds, not at the step's age."""
    layer, inputs = pair.layers[0], _inputs(files, 4)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=2.0, hedge_min_s=30)  # no hedges: only the deadline's failover
    d.set_table(pair.table(ALL_BOTH))
    try:
        _run(d, layer, inputs)  # connections open: no first call's set-up (> 0.5 s under load) runs out a deadline
        d.latency_s.clear()
        pair.servicers[0].faults.run_delay_s = 4.0
        out, took = _run(d, layer, inputs)
    finally:
        pair.servicers[0].faults.run_delay_s = 0.0
        d.close()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.failovers >= 1 and d.hedges == 0 and took >= 2.0, (d.failovers, d.hedges, took)
    assert d.latency_s and max(d.latency_s) < 1.5, list(d.latency_s)  # not the step's age (>= 2 s)


def test_malformed_and_missing_answers_go_to_another_copy(files, pair, transport):
    layer, inputs = pair.layers[0], _inputs(files, 3)
    ref = _reference(files, layer, *inputs)
    d = GrpcDispatcher(transport=transport, timeout_s=5)
    d.set_table(pair.table(ALL_BOTH))
    pair.servicers[1].faults.malformed_outputs = 1
    out, _ = _run(d, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert d.failovers >= 1
    pair.stores[0].drop([(layer, e) for e in range(4)])  # the table still lists them on s0: `missing`
    d2 = GrpcDispatcher(transport=transport, timeout_s=5)
    d2.set_table(pair.table(ALL_BOTH))
    out, _ = _run(d2, layer, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_orphans_wait_for_the_next_table(files, transport):
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]])
    try:
        layer, inputs = shards.layers[0], _inputs(files, 4)
        ref = _reference(files, layer, *inputs)

        def controller(sid):  # re-homes s0's experts onto s1, then answers with the new table
            shards.stores[1].load([(l, e) for l in shards.layers for e in range(4)])
            return shards.table({e: [1] for e in range(E)}, version=2, alive=[1])

        d = GrpcDispatcher(transport=transport, timeout_s=5, on_failure=controller)
        d.set_table(shards.table(SPLIT))
        shards.servers[0].stop(None)
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    finally:
        shards.close()


@pytest.mark.parametrize("version,epoch", [(2, "c1"), (1, "c2")], ids=["newer-version", "restarted-controller"])
def test_single_copy_straggler_is_hedged_once_a_new_table_has_a_copy(files, transport, version, epoch):
    """A paused shard holding the only copies: no hedge is possible until the controller re-homes them; the next
    table (arriving mid-step, from the poller) carries a copy elsewhere and the hedge goes there at once. A
    restarted controller's table is new whatever its version: the same number as the one tried counts too."""
    import threading

    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]])
    try:
        layer, inputs = shards.layers[0], _inputs(files, 6)
        ref = _reference(files, layer, *inputs)
        d = GrpcDispatcher(transport=transport, timeout_s=20, hedge_min_s=0.05)
        d.set_table(shards.table(SPLIT, epoch="c1"))
        for _ in range(5):
            _run(d, layer, inputs)
        shards.servicers[0].faults.run_delay_s = 10.0  # "paused": answers only after 10 s

        def rehome():  # the controller, 0.5 s later: s0's experts loaded on s1, a complete table without s0
            time.sleep(0.5)
            shards.stores[1].load([(l, e) for l in shards.layers for e in range(4)])
            d.set_table(shards.table({e: [1] for e in range(E)}, version=version, alive=[1], epoch=epoch))

        threading.Thread(target=rehome, daemon=True).start()
        out, took = _run(d, layer, inputs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert d.hedges == 1 and 0.5 <= took < 3.0, (d.hedges, took)
    finally:
        shards.servicers[0].faults.run_delay_s = 0.0
        shards.close()


def test_no_copy_anywhere_raises_experts_unavailable(files, transport):
    shards = Shards(files, [[0, 1, 2, 3], [4, 5, 6, 7]])
    try:
        d = GrpcDispatcher(transport=transport, timeout_s=1, failover_s=1.0)
        d.set_table(shards.table(SPLIT))
        shards.servers[0].stop(None)
        with pytest.raises(ExpertsUnavailable, match="unavailable"):
            _run(d, shards.layers[0], _inputs(files, 5))
    finally:
        shards.close()
