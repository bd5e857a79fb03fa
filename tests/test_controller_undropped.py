"""Drops a shard refused (RESOURCE_EXHAUSTED "shard busy": its LoadExperts / DropExperts slots full) are tried again,
without Ray, over real in-process gRPC shards: experts the placement no longer names there do not stay held until a
controller restart."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from elasticmoe.experts.server import PLACEMENT_CALLS
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.codec import decode_tensor, encode_tensor
from tests.controller_util import E, _gateway_behind_a_move, _moved, _quiet, _routed_to, _until, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture


@contextlib.contextmanager
def _busy(shard):
    """Every LoadExperts / DropExperts slot of `shard` taken, as PLACEMENT_CALLS calls still running would hold
    them: its placement calls are refused "shard busy" until the block ends."""
    slots = shard.servicer._placement_calls
    for _ in range(PLACEMENT_CALLS):
        assert slots.acquire(blocking=False)
    try:
        yield
    finally:
        for _ in range(PLACEMENT_CALLS):
            slots.release()


def _assigned(ctrl, shard) -> set[tuple[int, int]]:
    return set(ctrl.registry.assignment(ctrl.registry.shards[shard.shard_id].position))


def test_old_copies_a_busy_shard_refused_to_drop_are_dropped_once_it_is_free(model):  # noqa: F811
    """Expert 0 of every layer moved from a to b; once gateway g runs the new table, a's old copies are dropped,
    but a refuses (busy). They stayed held, named by no table, until a controller restart. The health round tries
    again (once every gateway runs the current table) until a takes the drop; one drop_failed event, not one a try."""
    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        moved = {(l, 0) for l in files.spec.moe.moe_layers}
        try:
            with _busy(a):
                new = await ctrl.table(old["version"], "g")  # g runs the new table: the drops go ahead
                await ctrl.table(new["version"], "g")
                # the drop (0.5 s after the ack) refused: waited for, not slept on (3 s could pass before it ran)
                await _until(lambda: ctrl.event_counts.get("drop_failed", 0) == 1, 30, "the refused drop")
                await asyncio.sleep(1.0)  # health rounds' tries meanwhile: all refused
                await ctrl.table(new["version"], "g")
                assert moved <= a.held() and not moved & _assigned(ctrl, a)
            await _until(lambda: not moved & a.held(), 10, "a's old copies dropped")
            assert a.held() == _assigned(ctrl, a) and b.held() == _assigned(ctrl, b)
            await _until(lambda: not ctrl._undropped, 5, "the drop's answer")  # the shard dropped before it answered
            assert ctrl.event_counts["drop_failed"] == 1
        finally:
            for task in list(ctrl._tasks):
                task.cancel()

    _with_shards(model, "ab", scenario)


def test_extras_a_busy_shard_refused_to_drop_at_its_ready_are_dropped_once_it_is_free(model):  # noqa: F811
    """b loaded a stale plan (an earlier registration attempt's: one more expert than its position is assigned);
    its ready() drops what the assignment does not name, but b is busy and refuses. It was published holding the
    extra for good; the health round drops it once b is free."""
    async def scenario(files, a, b):
        ctrl = await _quiet(model, a)
        plan = await ctrl.register("b", b.address)
        extra = next((l, e) for l in files.spec.moe.moe_layers for e in range(8) if (l, e) not in plan["experts"])
        b.store.load([*plan["experts"], extra])
        with _busy(b):
            await ctrl.ready("b")
            assert extra in b.held()
            await ctrl._health_once()  # its try: refused too
            await _until(lambda: ctrl.event_counts.get("drop_failed", 0) == 1, 30, "the refused drop")  # not slept on
            assert extra in b.held()
        await ctrl._health_once()
        await _until(lambda: extra not in b.held(), 5, "b's extra dropped")
        assert b.held() == _assigned(ctrl, b) and a.held() == _assigned(ctrl, a)
        await _until(lambda: not ctrl._undropped, 5, "the drop's answer")
        assert ctrl.event_counts["drop_failed"] == 1

    _with_shards(model, "ab", scenario)


@pytest.mark.parametrize("answered", ["as_its_caller_leaves", "after_the_roll_back_gave_up"])
def test_a_load_that_lands_as_its_caller_gives_up_is_dropped_again(model, answered):  # noqa: F811
    """The opposite race of a load stopped because its caller left (test_shard_load_cancel): a's load has read every
    expert and published them, past its last look at its caller, when the caller's deadline passes. The controller
    counts the load as failed (LoadFailed) while a holds its experts: the roll back's drop removes them once the
    load's call ends, or, where that drop gave up first (ROLLBACK_DROP_S), the health round's retry does."""
    from elasticmoe.autoscaler.moves import LoadFailed

    async def scenario(files, a, b):
        ctrl = await _quiet(model, a, b)
        before = a.held()
        extra = sorted((l, e) for l in files.spec.moe.moe_layers for e in range(8) if (l, e) not in before)[:3]
        load, landed, release = a.store.load, threading.Event(), threading.Event()

        def held_answer(pairs, **kw):  # the answer on its way while the caller's deadline passes
            n = load(pairs, **kw)
            landed.set()
            if answered == "as_its_caller_leaves":
                deadline = time.monotonic() + 10
                while not kw["stop"]() and time.monotonic() < deadline:  # the shard sees its caller gone
                    time.sleep(0.01)
            else:
                release.wait(10)
            return n

        a.store.load = held_answer
        with pytest.raises(LoadFailed):  # 3 s: the load lands first (0.3 s could pass before it reached a, loaded)
            await ctrl._load_many({a.address: extra}, deadline=time.monotonic() + 3.0)
        assert landed.is_set()
        if answered == "as_its_caller_leaves":
            assert a.held() == before and not ctrl._undropped  # the roll back's drop took them
        else:
            assert set(extra) <= a.held() and set(extra) <= ctrl._undropped["a"]  # landed; its drop gave up
            release.set()
            await ctrl._drop_undropped()
            assert a.held() == before and not ctrl._undropped

    _with_shards(model, "ab", scenario)


async def _answers(ctrl, shard, files, layer: int, expert: int) -> bool:
    """Whether `shard` answers RunExperts for 2 tokens routed to `expert` of `layer` (over the controller's channel)."""
    hidden = torch.randn(2, files.spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, H]
    ids = torch.full((2, 1), expert, dtype=torch.int32)  # [T, k]
    req = pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids),
                               topk_weights=encode_tensor(torch.ones(ids.shape)))
    out = decode_tensor((await ctrl._stub(shard.address).RunExperts(req, timeout=30)).output)
    return tuple(out.shape) == (2, files.spec.hidden_size)


def test_a_failed_load_whose_look_before_failed_keeps_the_old_copies_a_table_still_routes_to(model):  # noqa: F811
    """Expert 0 of every layer moved from a to b; g still runs the old table, which routes it to a (a's old copies
    wait for g's ack). A change moves it back to a with another expert; a's GetStats fails (held: unknown), then its
    load fails. The roll back dropped every pair it asked for, expert 0 too: g's table routed to copies a no longer
    held. Now a keeps them; what the load added waits for the retry, which drops it once g runs the current table."""
    from elasticmoe.autoscaler.moves import LoadFailed
    from elasticmoe.autoscaler.registry import Change

    async def scenario(files, a, b):
        ctrl, old = await _gateway_behind_a_move(model, a, b)
        layers = files.spec.moe.moe_layers
        back = {(l, 0) for l in layers}
        try:
            assert back <= a.held() & _routed_to(old, "a") and not back & _assigned(ctrl, a)
            extra = next(e for e in range(1, E) if not {(l, e) for l in layers} & a.held())
            added = {(l, extra) for l in layers}
            stats, load, loading = a.store.stats, a.store.load, threading.Event()

            def unknown():  # GetStats fails until the LoadExperts comes: the controller's look before it
                if not loading.is_set():
                    raise RuntimeError("injected: GetStats failed")
                return stats()

            def loads(pairs, **kw):
                loading.set()
                return load(pairs, **kw)

            a.store.stats, a.store.load = unknown, loads
            a.servicer.faults.fail_loads = 1  # a's load fails once it has loaded
            cur = ctrl.registry.placement
            async with ctrl._lock:
                with pytest.raises(LoadFailed):
                    await ctrl._apply(Change(cur, _moved(_moved(cur, 1, 0, 0), 1, 0, extra), {0: 0, 1: 1}), "back")
            assert loading.is_set() and a.servicer.faults.fail_loads == 0
            assert back <= a.held()  # g's table routes expert 0 to a: still held, and served
            assert all([await _answers(ctrl, a, files, l, 0) for l in layers])
            assert added <= ctrl._undropped["a"] and not added & _assigned(ctrl, a)
            new = await ctrl.table(old["version"], "g")  # g runs the current table: old copies and extras go
            await ctrl.table(new["version"], "g")
            await ctrl._drop_undropped()
            await _until(lambda: a.held() == _assigned(ctrl, a), 10, "a's old copies and the load's extras dropped")
            assert not ctrl._undropped and b.held() == _assigned(ctrl, b)
        finally:
            for task in list(ctrl._tasks):
                task.cancel()

    _with_shards(model, "ab", scenario)
