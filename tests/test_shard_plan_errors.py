"""An expert shard whose registration plan names experts the checkpoint cannot give (a file truncated after the shard
opened it): the error, naming the file and the tensor, reaches the controller's status, the log and the replica's
health at once; the plan is tried again with a backoff, not 600 times; the layers that loaded stay held; the file
repaired, a later try loads the rest and the shard gets ready. So are the experts assigned to it since its plan,
which the controller's ready() loads. A real replica (ExpertShard's own start, its gRPC server) and a real controller
on an event loop thread, over a sharded tiny checkpoint. No Ray."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch

from elasticmoe import status_view
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.experts import deployment
from elasticmoe.experts.deployment import ExpertShard
from elasticmoe.model import open_model
from elasticmoe.model.tiny import make_tiny_model
from tests.controller_util import ControllerImpl, Shard, _args, _LoopHandle, on_loop, wait_until, _moved

E = 8
BROKEN = "model.layers.1.block_sparse_moe.experts.0.w2.weight"  # its file holds layer 1's w2 of every expert


class _Shard(ExpertShard.func_or_class):
    def __del__(self):  # Serve awaits the real one when it stops a replica; the test stops this one itself
        pass


@pytest.fixture
def cluster(tmp_path):
    """(a sharded tiny checkpoint, a real controller of one shard over it on an event loop thread, that loop)."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E, max_shard_size="100KB")
    GcsRecord("default").clear()
    threads = torch.get_num_threads()  # the replica sets its process's torch threads (shard_resources.num_cpus)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="controller-loop", daemon=True)
    runner.start()

    async def make():
        return ControllerImpl(_args(str(path), num_shards=1))

    ctrl = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
    yield path, ctrl, loop
    for task in list(ctrl._tasks):
        loop.call_soon_threadsafe(task.cancel)
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)
    torch.set_num_threads(threads)


def _errors(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno >= logging.ERROR]


def _with_lock_held(ctrl, loop, then):
    """then()'s result, the controller's lock held meanwhile (a replica started in then() waits to register)."""
    held, release = threading.Event(), threading.Event()

    async def hold():
        async with ctrl._start():
            held.set()
            await asyncio.to_thread(release.wait, 30)

    holding = asyncio.run_coroutine_threadsafe(hold(), loop)
    assert held.wait(30)
    try:
        return then()
    finally:
        release.set()
        holding.result(30)


def _started_then_broken(path, ctrl, loop):
    """A replica started over `path` (its checkpoint opened), then BROKEN's file cut short before its plan is loaded
    (the controller's lock held meanwhile: its registration waits). Returns (replica, the file, its bytes)."""
    def start():
        replica = _Shard(_args(str(path), num_shards=1), _LoopHandle(ctrl, loop))
        file = replica.store.ckpt.file_of(BROKEN)
        data = file.read_bytes()
        file.write_bytes(data[:-100])  # an interrupted copy: the header whole, the last tensor cut
        return replica, file, data
    return _with_lock_held(ctrl, loop, start)


def test_an_unreadable_plan_is_reported_backs_off_and_a_repaired_file_is_read(cluster, monkeypatch, caplog):
    """Before: each try failed with a warning like the controller's start-up ('registration attempt 7 failed'), up to
    600 tries every 2 s, each reading the whole plan again; the controller showed the shard 'loading', nothing else,
    and Serve's health check said so only after 600 s."""
    path, ctrl, loop = cluster
    # the backoff's schedule, shortened: 0.2, 0.4, 0.8, 0.8 s
    monkeypatch.setattr(deployment, "PLAN_RETRY_S", 0.2, raising=False)
    monkeypatch.setattr(deployment, "PLAN_RETRY_MAX_S", 0.8, raising=False)
    caplog.set_level(logging.INFO)
    layer0, layer1 = ctrl.moe_layers  # BROKEN's layer is the second
    replica, file, data = _started_then_broken(path, ctrl, loop)
    try:
        wait_until(lambda: len(_errors(caplog, "elasticmoe.shard")) >= 4, 30, "four failed tries of the plan, each an error")
        fails = _errors(caplog, "elasticmoe.shard")
        assert all(file.name in r.getMessage() and BROKEN in r.getMessage() for r in fails)
        gaps = [b.created - a.created for a, b in zip(fails, fails[1:4])]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps  # each wait twice the last, up to the cap
        assert not replica.registered.is_set()
        assert replica.store.held() == [(layer0, e) for e in range(E)]  # the readable layer stays: retries read less

        st = on_loop(loop, ctrl.status())
        (entry,) = st["shards"]
        assert not entry["ready"] and status_view.health(entry) == "failed"
        assert file.name in entry["load_error"] and BROKEN in entry["load_error"] and f"layer {layer1}" in \
            entry["load_error"]
        assert f"shard {entry['id']} cannot load its experts: {entry['load_error']}" in status_view.render(st)
        events = [e for e in st["events"] if e["event"] == "plan_failed"]
        assert len(events) == 1 and events[0]["shard"] == replica.shard_id  # once, not once per try
        ctrl_logs = _errors(caplog, "elasticmoe.controller")
        assert len(ctrl_logs) == 1 and file.name in ctrl_logs[0].getMessage()
        assert asyncio.run(replica.info())["load_error"] == entry["load_error"]
        replica.started -= 601  # Serve's health check, past the start deadline: the checkpoint named, not the wait
        with pytest.raises(RuntimeError, match=rf"cannot load its experts after 600 s \(\d+ tries in a row\): "
                                               rf".*{file.name}.*{BROKEN}"):
            replica.check_health()
        replica.started += 601

        file.write_bytes(data)  # repaired (the same bytes put back): a later try reads it
        wait_until(replica.registered.is_set, 30, "the shard ready once its file is repaired")
        assert replica.store.held() == [(l, e) for l in (layer0, layer1) for e in range(E)]
        (entry,) = on_loop(loop, ctrl.status())["shards"]
        assert entry["ready"] and "load_error" not in entry and status_view.health(entry) == "ok"
        assert asyncio.run(replica.info())["load_error"] is None
        replica.check_health()
    finally:
        replica._stop_registering()
        replica.server.stop(None)



@pytest.fixture
def pair(tmp_path):
    """(a sharded tiny checkpoint, a real controller of two positions on an event loop thread, that loop), an
    in-process shard at the first position."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E, max_shard_size="100KB")
    GcsRecord("default").clear()
    threads, loop = torch.get_num_threads(), asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="controller-loop", daemon=True)
    runner.start()
    first = Shard(open_model(str(path)), "a")

    async def make():
        ctrl = ControllerImpl(_args(str(path), num_shards=2))
        await first.join(ctrl)
        return ctrl

    ctrl = on_loop(loop, make(), 60)
    yield path, ctrl, loop
    first.server.stop(None)
    for task in list(ctrl._tasks):
        loop.call_soon_threadsafe(task.cancel)
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)
    torch.set_num_threads(threads)


def _moved_after_its_plan(path, ctrl, loop):
    """A replica at the second position whose first plan, once loaded, is stale: a change commits that moves expert
    0 of every layer from the first position to its own, and BROKEN's file is cut short. Returns (replica, the file,
    its bytes)."""
    from elasticmoe.autoscaler.registry import Change

    async def move():
        async with ctrl._lock:
            cur = ctrl.registry.placement
            await ctrl._apply(Change(cur, _moved(cur, 0, 1, 0), {0: 0, 1: 1}), "a change after the plan")

    def start():
        replica = _Shard(_args(str(path), num_shards=2), _LoopHandle(ctrl, loop))
        file, real, plans = replica.store.ckpt.file_of(BROKEN), replica.servicer.apply_plan, []

        def apply_plan(*args):
            out = real(*args)
            plans.append(args)
            if len(plans) == 1:
                on_loop(loop, move())
                file.write_bytes(data[:-100])
            return out

        data, replica.servicer.apply_plan = file.read_bytes(), apply_plan
        return replica, file, data
    return _with_lock_held(ctrl, loop, start)


def test_new_copies_that_cannot_be_read_at_ready_are_retried_as_the_plan_is(pair, monkeypatch, caplog):
    """The replica loaded its plan; a change committed meanwhile moved expert 0 of every layer to its position, and
    BROKEN's file cannot give layer 1's. The controller's ready() loads them before publishing it: it raised the
    load's error, the replica logged a warning ('registration attempt 0 failed') and tried again at once, and the
    controller's status said nothing of it. ready() now answers the error: the replica logs it naming the file and
    the tensor, the status shows it, and the replica tries again with its plan's backoff (its plan then names those
    experts: the same file fails it, one more message); the file repaired, it gets ready."""
    path, ctrl, loop = pair
    monkeypatch.setattr(deployment, "PLAN_RETRY_S", 0.2, raising=False)
    monkeypatch.setattr(deployment, "PLAN_RETRY_MAX_S", 0.4, raising=False)
    caplog.set_level(logging.INFO)
    replica, file, data = _moved_after_its_plan(path, ctrl, loop)
    try:
        wait_until(lambda: len(_errors(caplog, "elasticmoe.shard")) >= 3, 30, "three failed tries, each an error")
        fails = _errors(caplog, "elasticmoe.shard")
        assert all(file.name in r.getMessage() and BROKEN in r.getMessage() for r in fails)
        assert "since its plan" in fails[0].getMessage()  # ready()'s answer, then the plan's own failures
        assert not [r for r in caplog.records if "registration attempt" in r.getMessage()]
        gaps = [b.created - a.created for a, b in zip(fails, fails[1:3])]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # the backoff's
        st = on_loop(loop, ctrl.status())
        entry = next(s for s in st["shards"] if s["id"] == replica.shard_id)
        assert status_view.health(entry) == "failed" and BROKEN in entry["load_error"]
        assert len([e for e in st["events"] if e["event"] == "plan_failed"]) == 2  # one per message, not per try

        file.write_bytes(data)
        wait_until(replica.registered.is_set, 30, "the replica ready once the file is repaired")
        assert {(layer, 0) for layer in ctrl.moe_layers} <= set(replica.store.held())
    finally:
        replica._stop_registering()
        replica.server.stop(None)
