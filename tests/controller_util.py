"""Scaffolding of the controller tests: in-process gRPC shards, a tiny model, a cleared record, waits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from elasticmoe.autoscaler.controller import Controller
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

E = 8
ControllerImpl = Controller.func_or_class  # the class itself, outside Serve


class Shard:
    """An expert shard as the deployment runs it: a gRPC server over a store, registered with the controller."""

    def __init__(self, files, shard_id: str):
        self.shard_id = shard_id
        self.store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
        self.server, self.servicer, port = start_server(self.store, shard_id)
        self.address = f"127.0.0.1:{port}"

    async def join(self, ctrl) -> None:
        plan = await ctrl.register(self.shard_id, self.address)
        self.store.load(plan["experts"])
        await ctrl.ready(self.shard_id)

    def held(self) -> set[tuple[int, int]]:
        return set(self.store.held())


class _LoopHandle:
    """The call shape of a Serve handle (`handle.method.remote(*args).result(timeout_s)`) from another thread, over
    an in-process controller whose coroutines run on `loop`."""

    def __init__(self, target, loop: asyncio.AbstractEventLoop):
        self.target, self.loop = target, loop

    def __getattr__(self, name):
        method, loop = getattr(self.target, name), self.loop

        class Call:
            def __init__(self, future):
                self.future = future

            def result(self, timeout_s=None):
                return self.future.result(timeout=timeout_s)

        return type("Method", (), {"remote": staticmethod(
            lambda *args: Call(asyncio.run_coroutine_threadsafe(method(*args), loop)))})()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return str(make_tiny_model("mixtral", tmp_path_factory.mktemp("ctl") / "m", layers=2, experts=E))


def _args(model: str, **kw) -> dict:
    return {"model": model, "num_shards": 2, "dtype": "float32", "device": "cpu", **kw}


async def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def _quiet(model: str, *joined: "Shard", **args):
    """A controller over `joined` (each joined in turn), its loops cancelled: the rounds a test runs are the only
    ones."""
    ctrl = ControllerImpl(_args(model, **args))
    for shard in joined:
        await shard.join(ctrl)
    for task in list(ctrl._tasks):
        task.cancel()
    return ctrl


def _with_shards(model: str, names: str, scenario) -> None:
    """Run `scenario(files, *shards)` on a cleared GCS record with an in-process shard per letter of `names`; every
    shard's server stops afterwards, whatever happened."""
    files = open_model(model)
    GcsRecord("default").clear()

    async def run():
        shards = [Shard(files, x) for x in names]
        try:
            await scenario(files, *shards)
        finally:
            for s in shards:
                s.server.stop(None)

    asyncio.run(run())


def _live_copies(table: dict) -> list[list[int]]:
    return [[len(reps) for reps in experts] for experts in table["layers"].values()]


def _routed_to(table: dict, shard_id: str) -> set[tuple[int, int]]:
    """(model layer, expert) pairs the table routes to `shard_id`."""
    i = [s["id"] for s in table["shards"]].index(shard_id)
    return {(int(l), e) for l, experts in table["layers"].items() for e, reps in enumerate(experts)
            if any(s == i for s, _ in reps)}


def _moved(cur, src: int, dst: int, expert: int):
    """`cur` with `expert` of every layer moved from position `src` to `dst`."""
    from elasticmoe.placement import Placement

    holds, shares = cur.holds(), cur.shares()  # [L, E, N]
    holds[:, expert, dst], shares[:, expert, dst] = True, shares[:, expert, src]
    holds[:, expert, src], shares[:, expert, src] = False, 0.0
    return Placement.from_arrays(shares, holds, cur.slots_per_shard)


async def _gateway_behind_a_move(model: str, a: Shard, b: Shard):
    """A controller over shards a and b, gateway "g" running its first table, then expert 0 of every layer moved
    from a to b (committed; a's copies are dropped once g acknowledges). Returns (controller, g's table)."""
    from elasticmoe.autoscaler.registry import Change

    ctrl = ControllerImpl(_args(model))
    await a.join(ctrl)
    await b.join(ctrl)
    old = await ctrl.table(-1, "g")
    assert await ctrl.table(old["version"], "g") is None  # g runs `old`
    cur = ctrl.registry.placement
    async with ctrl._lock:
        await ctrl._apply(Change(cur, _moved(cur, 0, 1, 0), {0: 0, 1: 1}), "test move")
    return ctrl, old


@pytest.fixture
def controller(model):
    """(a real controller on an event loop thread, that loop); torch's thread count restored (the replicas set it)."""
    GcsRecord("default").clear()
    threads = torch.get_num_threads()
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="controller-loop", daemon=True)
    runner.start()

    async def make():
        return ControllerImpl(_args(model, num_shards=1))

    ctrl = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
    yield ctrl, loop
    for task in list(ctrl._tasks):
        loop.call_soon_threadsafe(task.cancel)
    loop.call_soon_threadsafe(loop.stop)
    runner.join(10)
    torch.set_num_threads(threads)


def on_loop(loop, coro, timeout: float = 60.0):
    """Run `coro` on the event loop `loop` (running in another thread) and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms until true; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
