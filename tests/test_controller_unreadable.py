"""A checkpoint file the shards cannot read (cut short after they opened it) under the controller's decisions: a
re-home, a revival and a new shard's ready() that need an expert from it fail alike on every try until the file is
repaired, so they are tried again with a backoff, not every health round, and `elasticmoe status` says which fails
and why (the file, the tensor); once it is repaired the next try goes through. Real in-process gRPC shards and
controller over a sharded tiny checkpoint."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from elasticmoe import status_view
from elasticmoe.model.tiny import make_tiny_model
from tests.controller_util import E, _moved, _quiet, _with_shards

BROKEN = "model.layers.1.block_sparse_moe.experts.0.w2.weight"  # its file holds layer 1's w2 of every expert


@pytest.fixture
def sharded(tmp_path):
    """A tiny checkpoint in many files (one test cuts one short), under a long path as a hub snapshot's is (an event's
    error cut at 300 characters lost the tensor's name after the path in CI's xdist trial, whose paths are longer)."""
    deep = tmp_path / "models--elasticmoe--tiny-mixtral-unreadable" / "snapshots" / ("0123456789abcdef" * 5) / "m"
    return str(make_tiny_model("mixtral", deep, layers=2, experts=E, max_shard_size="100KB"))


def _cut(files):
    """BROKEN's file cut short (an interrupted copy): (the file, its bytes to put back)."""
    file = files.ckpt.file_of(BROKEN)
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    return file, data


async def _rounds(ctrl, seconds: float) -> None:
    """Health rounds, one after another, for `seconds` (the loop runs one a second: these are faster)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await ctrl._health_once()


async def _rounds_until(ctrl, done, what: str, pause: float = 0.1, timeout: float = 10.0) -> None:
    """Health rounds, `pause` s apart, until `done()`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await ctrl._health_once()
        await asyncio.sleep(pause)


def _says(text: str, file) -> bool:
    return file.name in text and BROKEN in text


def test_a_re_home_that_cannot_read_an_expert_backs_off_and_says_why(sharded, caplog):
    """a dies; the copies of layer 1 that its experts need on b cannot be read (BROKEN's file cut short). Each health
    round tried the re-home again (10 tries in 3 s here, each loading a's experts onto b and rolling them back), a
    rehome_failed event each whose error, cut at 200 characters of gRPC's repr, lost the file's name, and `elasticmoe
    status` said nothing of it. The first retry is the next round's, the next waits 2 s; status shows the failing
    re-home with the file and the tensor; the file repaired, the next try re-homes a's experts."""
    caplog.set_level(logging.INFO)

    async def scenario(files, a, b):
        ctrl = await _quiet(sharded, a, b)
        file, data = _cut(files)
        try:
            a.server.stop(None)
            await _rounds_until(ctrl, lambda: ctrl.event_counts.get("rehome_failed") == 2, "two tries", pause=0.0)
            await _rounds(ctrl, 1.0)  # within the 2 s wait
            assert ctrl.event_counts["rehome_failed"] == 2 and "a" in ctrl.registry.shards
            assert not (await ctrl.table())["complete"]
            fails = [e for e in ctrl.events if e["event"] == "rehome_failed"]
            assert _says(fails[-1]["error"], file) and fails[-1]["retry_in_s"] == 2.0
            st = await ctrl.status()
            failing = st["retrying"]["re-home a"]
            assert failing["tries"] == 2 and 0 < failing["retry_in_s"] <= 2.0 and _says(failing["error"], file)
            assert any(line.startswith("re-home a failing (2 in a row") and _says(line, file)
                       for line in status_view.render(st).splitlines())
            logged = [r for r in caplog.records if r.name == "elasticmoe.controller" and r.levelno >= logging.ERROR]
            assert len(logged) == 1 and _says(logged[0].getMessage(), file)  # once per message, not per try
        finally:
            file.write_bytes(data)
        await _rounds_until(ctrl, lambda: "a" not in ctrl.registry.shards, "a's experts re-homed")
        table = await ctrl.table()
        assert "a" not in ctrl.registry.shards and table["complete"] and ctrl.event_counts["rehome_failed"] == 2
        assert (await ctrl.status())["retrying"] == {}

    _with_shards(sharded, "ab", scenario)


def test_a_shard_that_dies_while_a_re_home_backs_off_is_tried_at_once(sharded):
    """The back-off belongs to the set of shards being re-homed: a's re-home fails twice (its next try 2 s away), then
    c dies too. Re-homing a and c together is a new decision, tried in the next round, not after a's wait (under one
    shared "re-home" back-off, of up to 30 s, it waited); status shows it alone, a's own superseded."""

    async def scenario(files, a, b, c):
        ctrl = await _quiet(sharded, a, b, c)
        file, data = _cut(files)
        try:
            a.server.stop(None)
            await _rounds_until(ctrl, lambda: ctrl.event_counts.get("rehome_failed") == 2, "two tries", pause=0.0)
            assert 1.0 < (await ctrl.status())["retrying"]["re-home a"]["retry_in_s"] <= 2.0
            c.server.stop(None)
            await _rounds_until(ctrl, lambda: ctrl.event_counts["rehome_failed"] >= 3, "a try with c", pause=0.0,
                                timeout=1.0)  # well within a's wait (each dead shard's _lose in a round tries it)
            fails = [e for e in ctrl.events if e["event"] == "rehome_failed"]
            assert _says(fails[-1]["error"], file)
            assert set((await ctrl.status())["retrying"]) == {"re-home a c"}
        finally:
            file.write_bytes(data)
        await _rounds_until(ctrl, lambda: not {"a", "c"} & set(ctrl.registry.shards), "a's and c's experts re-homed")
        assert (await ctrl.table())["complete"] and (await ctrl.status())["retrying"] == {}

    _with_shards(sharded, "abc", scenario)


def _counting_loads(shard) -> list[list]:
    """The pairs of each load of `shard`'s store from now on (the LoadExperts it serves), in order."""
    loads, real = [], shard.store.load

    def load(pairs, *args, **kw):
        loads.append(list(pairs))
        return real(pairs, *args, **kw)

    shard.store.load = load
    return loads


def test_a_revival_that_cannot_reload_an_expert_backs_off_and_says_why(sharded):
    """a answers again but lacks expert 0 of layer 1 (found unhealthy, as a restarted controller's failed reload
    leaves it), and BROKEN's file cannot give it: the revival's reload fails, and so does the re-home of a's experts
    onto b that follows. Each health round did both again: a load on a and one of a's experts on b every round, for
    good. Both now wait their backoffs and show in status; the file repaired, a is revived holding its assignment."""
    async def scenario(files, a, b):
        ctrl = await _quiet(sharded, a, b)
        layer1 = ctrl.moe_layers[1]
        assert (layer1, 0) in a.held()
        a.store.drop([(layer1, 0)])
        ctrl._mark_failed([ctrl.registry.shards["a"]], "reload failed in recovery")
        file, data = _cut(files)
        on_a, on_b = _counting_loads(a), _counting_loads(b)
        try:
            await _rounds_until(ctrl, lambda: len(on_a) == 2, "two tries", pause=0.0)
            await _rounds(ctrl, 1.0)  # within the 2 s waits
            assert on_a == [[(layer1, 0)]] * 2 and len(on_b) == 2 and ctrl.event_counts["rehome_failed"] == 2
            retrying = (await ctrl.status())["retrying"]
            assert set(retrying) == {"re-home a", "revive a"} and all(_says(r["error"], file) for r in retrying.values())
            assert not ctrl.registry.shards["a"].healthy and not (await ctrl.table())["complete"]
        finally:
            file.write_bytes(data)
        await _rounds_until(ctrl, lambda: ctrl.registry.shards["a"].healthy, "a revived")
        table = await ctrl.table()
        assert table["complete"] and [x["id"] for x in table["shards"]] == ["a", "b"] and (layer1, 0) in a.held()
        assert (await ctrl.status())["retrying"] == {}  # nothing left to re-home: its backoff is over too

    _with_shards(sharded, "ab", scenario)


def test_a_new_shard_whose_new_copies_cannot_be_read_is_told_and_shown_once(sharded):
    """c loaded its plan; a change committed meanwhile moved expert 0 of every layer to c's position, and BROKEN's
    file cannot give layer 1's. ready() loads them before publishing c: it raised the load's error, so c's
    registration retried at once (0.2 s) as for a controller still starting, with nothing in c's status. It now
    answers the error (the file, the tensor), which c's status shows (failed) and the events record once, as a
    plan that cannot be read (c tries again with its backoff); the file repaired, the next ready() publishes c."""
    from elasticmoe.autoscaler.registry import Change

    async def scenario(files, a, c):
        ctrl = await _quiet(sharded, a)
        plan = await ctrl.register("c", c.address)
        c.store.load(plan["experts"])
        cur = ctrl.registry.placement
        async with ctrl._lock:
            await ctrl._apply(Change(cur, _moved(cur, 0, 1, 0), {0: 0, 1: 1}), "a change after c's plan")
        file, data = _cut(files)
        try:
            for _ in range(3):  # c's tries
                answer = await ctrl.ready("c")
                assert set(answer) == {"load_error"} and _says(answer["load_error"], file)
                await ctrl.plan_failed("c", answer["load_error"])  # what c reports (experts.deployment)
            st = await ctrl.status()
            entry = next(s for s in st["shards"] if s["id"] == "c")
            assert status_view.health(entry) == "failed" and entry["load_error"] == answer["load_error"]
            assert ctrl.event_counts["plan_failed"] == 1  # once, not once per try
            assert "c" not in [x["id"] for x in (await ctrl.table())["shards"]]
        finally:
            file.write_bytes(data)
        assert set(await ctrl.ready("c")) == {"version"}
        table = await ctrl.table()
        assert table["complete"] and "c" in [x["id"] for x in table["shards"]]
        assert {(layer, 0) for layer in ctrl.moe_layers} <= c.held()
        assert "load_error" not in next(s for s in (await ctrl.status())["shards"] if s["id"] == "c")

    _with_shards(sharded, "ac", scenario)
