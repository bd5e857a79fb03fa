"""Scaffolding of the client-gone tests: a gate that holds the engine at the start of a step (its state then stands
still, so a client's cancel lands at a known point), a readiness wait that holds a request before admission, and
the checks every such test makes once the engine has gone on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from elasticmoe.engine.scheduler import Sequence, Status
from tests.openai_util import Core, SlowDispatcher

STAGES = ("unready", "inbox", "queued", "prefill", "decode")  # where a client goes away; "after the end" apart
NEIGHBOUR = "Once upon a time"  # the request beside the one whose client goes away
VICTIM = " ".join(["Mixture of experts routes each token to a few experts."] * 4)  # > 3 prefill chunks of 16
K = 3  # tokens a request has generated (and a stream has delivered) before its client leaves mid-decode


class Gate(SlowDispatcher):
    """In-process experts; `hold()` stops the engine at the start of its next step (scheduled, nothing run yet)
    until `release()`. While it is held, engine state stands still and requests only reach the runner's inbox."""

    def __init__(self, store):
        super().__init__(store)
        self._armed, self._go, self.held = False, threading.Event(), threading.Event()

    def begin_step(self) -> None:  # the engine's hook at the start of each step's forward
        if self._armed:
            self._armed, go = False, self._go
            self.held.set()
            go.wait(30)

    def hold(self) -> None:
        self._go, self._armed = threading.Event(), True
        self.held.clear()
        assert self.held.wait(10), "the engine took no step"

    def step(self) -> None:
        """Held: run this step and hold at the start of the next."""
        go = self._go
        self.held.clear()
        self._go, self._armed = threading.Event(), True
        go.set()
        assert self.held.wait(10), "the engine took no further step"

    def step_until(self, cond: Callable[[], bool], limit: int = 100) -> None:
        for _ in range(limit):
            if cond():
                return
            self.step()
        raise AssertionError("the engine never reached the state the test waits for")

    def release(self) -> None:
        self._armed = False
        self._go.set()


def gated(model, **limits) -> tuple[Core, Gate]:
    """A Core (tests/openai_util.py) whose engine steps through a Gate; engine.add_request keys are kept in
    core.added (the call goes through: a record, not a stand-in). A KV block holds a whole context (unless given):
    no sequence grows into another block, so the blocks of an aborted one stay as its abort left them (zero) for
    assert_aborted to read; growing, a neighbour took them (the pool gives the last freed first) and wrote there."""
    limits.setdefault("kv_block_size", limits.get("max_model_len", 2048))
    core = Core(*model, **limits)
    gate = Gate(model[1])
    engine = core.runner.engine
    core.dispatcher = engine.dispatcher = gate
    core.added = []
    add = engine.add_request
    engine.add_request = lambda key, ids, params, resume=None: (core.added.append(key),
                                                                add(key, ids, params, resume))[1]
    return core, gate


class Readiness:
    """core.wait_ready that, once `block()`ed, holds every request calling it (shards not ready yet)."""

    def __init__(self, core: Core):
        self.blocked, self.waiting = False, 0
        core.wait_ready = self.wait

    async def wait(self) -> None:
        if self.blocked:
            self.waiting += 1
            while self.blocked:
                await asyncio.sleep(0.01)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def victims(core: Core, neighbour_ids: list[int]) -> list[Sequence]:
    """The engine's sequences other than the neighbour's (read while the gate holds the engine)."""
    return [s for s in core.runner.engine.seqs.values() if s.prompt_ids != neighbour_ids]


def at_stage(core: Core, neighbour_ids: list[int], stage: str) -> Callable[[], bool]:
    """Whether the request beside the neighbour is at `stage` (read while held): queued (waiting for a slot), in
    its prefill (some of its prompt cached, not all) or mid-decode (K tokens out, not finished)."""
    def check() -> bool:
        vs = victims(core, neighbour_ids)
        if stage == "queued":
            return bool(vs) and all(s in core.runner.engine.scheduler.waiting for s in vs)
        if stage == "prefill":
            return (any(s.status is Status.RUNNING and 0 < s.num_cached < len(s.prompt_ids) for s in vs)
                    and not any(s.output_ids for s in vs))
        return bool(vs) and all(len(s.output_ids) >= K and not s.finished for s in vs)
    return check


def assert_aborted(core: Core, held: list[Sequence], tokens_at_cancel: list[int], num_slots: int) -> None:
    """Once idle: nothing runs, waits or holds a place; each sequence held at the cancel was aborted before its
    next step (one more token at most: the step it was scheduled in when held) and its slot's K/V are zero."""
    wait_for(lambda: not any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")),
             f"the engine still holds the abandoned request: {core.runner.stats()}")
    engine = core.runner.engine
    assert engine.seqs == {} and engine.scheduler.num_free_slots == num_slots
    for s, n in zip(held, tokens_at_cancel):
        assert s.finish_reason == "abort" and len(s.output_ids) <= n + 1, (s.finish_reason, len(s.output_ids), n)
        if s.slot >= 0:
            cache = engine.cache  # the blocks of its slot (the table's row stays until the slot is given again)
            assert all(not cache.of_slot(t, s.slot).any() for layer in cache.layers for t in layer), "its K/V were kept"


def never_ran(core: Core, stage: str, held: list[Sequence]) -> None:
    """A request gone before it reached the engine never did (the engine was given the neighbour only); one gone
    while queued never had a slot."""
    assert len(core.added) == 1 + len(held), core.added
    assert (held == []) == (stage in ("unready", "inbox"))
    assert (bool(held) and all(s.slot == -1 for s in held)) == (stage == "queued")


def quiet(caplog) -> None:
    """No warning, error or traceback was logged (by us, grpc, asyncio, uvicorn or Starlette)."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, "\n".join(f"{r.name} {r.levelname}: {r.getMessage()}" for r in loud)

