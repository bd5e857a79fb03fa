"""Each server replica freezes its start-up heap (elasticmoe/heap.py): after a Gateway (and its HTTP app) or an
ExpertShard is built in this process, a full collection walks a small part of the objects it walked before, and
takes that much less time; an offline LLM (a library object: a process may build many) does not freeze. Real parts:
a tiny checkpoint, a real controller on an event loop, real gRPC servers."""

from __future__ import annotations

import gc
import time

import pytest

from elasticmoe import LLM
from elasticmoe.experts.deployment import ExpertShard
from elasticmoe.gateway.deployment import Gateway
from elasticmoe.model.embedded import ensure_tiny_model
from tests.controller_util import _args, _LoopHandle, controller  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def model() -> str:
    """controller_util's model (tiny mixtral, 2 layers, 8 experts, seed 0) as cached: made once a machine, not once a
    run (and not imported transformers' modeling code for it)."""
    return str(ensure_tiny_model("mixtral"))


def _full_collection() -> tuple[int, float]:
    """(objects a full collection walks, its best time of 3 in this thread's CPU seconds: not the other processes'
    turns on a loaded machine)."""
    walked, best = len(gc.get_objects()), float("inf")
    for _ in range(3):
        t = time.thread_time()
        gc.collect()
        best = min(best, time.thread_time() - t)
    return walked, best


def _started(build):
    """build() from an unfrozen heap: (what it built, the full collection before, after)."""
    gc.unfreeze()  # an earlier start-up in this process froze what was there then
    assert gc.get_freeze_count() == 0
    before = _full_collection()
    built = build()
    return built, before, _full_collection()


def _frozen_and_cheap(before: tuple[int, float], after: tuple[int, float]) -> None:
    assert gc.get_freeze_count() > before[0] // 2  # the heap of start-up, and the modules before it
    assert after[0] < before[0] / 10, f"a full collection still walks {after[0]} objects of {before[0]}"
    assert after[1] < before[1] / 4, f"a full collection took {after[1]:.4f} s, {before[1]:.4f} s before"


def test_an_llm_leaves_the_heap_unfrozen(model):
    """Freezing is for a server process's one start-up: an LLM built and dropped in a notebook or a test run must
    not pin the cycles of everything alive then until exit."""
    gc.unfreeze()  # no full collections measured: nothing here compares them
    assert gc.get_freeze_count() == 0
    LLM(model)
    assert gc.get_freeze_count() == 0


# our class under Serve's ingress wrapper (whose async __init__ runs ours, then attaches the ASGI app Serve builds)
_GATEWAY = next(c for c in Gateway.func_or_class.__mro__ if "__serve_build_asgi_app__" in c.__dict__)


def test_a_gateway_and_its_http_app_freeze_their_startup_heap(model, controller):
    ctrl, loop = controller
    replica, before, after = _started(lambda: _GATEWAY(_args(model, num_shards=1), _LoopHandle(ctrl, loop)))
    core = replica.core
    try:
        _frozen_and_cheap(before, after)
        frozen = gc.get_freeze_count()
        assert replica.__serve_build_asgi_app__() is not None
        assert gc.get_freeze_count() > frozen  # the app's routes and models too
    finally:
        core.stopped.set()
        core.runner.close()
        core.dispatcher.close()


class _Shard(ExpertShard.func_or_class):
    def __del__(self):  # Serve awaits the real one when it stops a replica; the test stops this one itself
        pass


def test_an_expert_shard_freezes_its_startup_heap(model, controller):
    ctrl, loop = controller
    shard, before, after = _started(lambda: _Shard(_args(model, num_shards=1), _LoopHandle(ctrl, loop)))
    try:
        _frozen_and_cheap(before, after)
        assert shard.registered.wait(60)  # and it serves: registered with the controller, its experts loaded
        assert shard.store.held()
    finally:
        shard._stop_registering()
        shard.server.stop(None)
