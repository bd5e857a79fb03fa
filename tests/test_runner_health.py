"""The gateway's health check over its engine runner: a runner whose steps keep raising reports unhealthy."""

from __future__ import annotations

import asyncio

import pytest

from elasticmoe import SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.gateway.deployment import GatewayCore
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import LocalDispatcher
from tests.test_admission import model  # noqa: F401 - a fixture: a tiny Mixtral with every expert loaded

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


class BrokenEngine(Engine):
    """A real engine whose step raises outside any request's part while `broken` (a bug, a lost device)."""

    broken = True
    raised = 0  # steps that raised

    def step(self):
        if self.broken:
            self.raised += 1
            raise RuntimeError("injected: the step itself failed")
        return super().step()


def _core(runner: EngineRunner) -> GatewayCore:
    core = object.__new__(GatewayCore)
    core.runner = runner
    return core


async def _one(runner: EngineRunner, ids: list[int]) -> list[int]:
    out: list[int] = []
    async for u in runner.generate("r", ids, GREEDY):
        out += u.token_ids
    return out


def _runner(model) -> tuple[BrokenEngine, EngineRunner, list[int]]:
    _, files, store = model
    engine = BrokenEngine(files, LocalDispatcher(store), max_model_len=64, retry_backoff_s=(0.0,))
    return engine, EngineRunner(engine), engine.tokenizer.encode("Once upon a time")


def test_requests_waiting_behind_steps_that_keep_raising_end_with_an_error(model):
    """A step raising before it scheduled anything leaves the new request waiting, not running: after three
    failed steps in a row it must end too (RequestFailed), not wait forever while the engine retries."""
    engine, runner, ids = _runner(model)
    try:
        with pytest.raises(RequestFailed, match="engine step failed"):
            asyncio.run(asyncio.wait_for(_one(runner, ids), 30))
        assert engine.raised == 3 and runner.gave_up  # the README's "raised three times in a row"
        assert runner.stats()["admitted"] == 0 and not engine.scheduler.waiting and engine.scheduler.num_free_slots
        engine.broken = False
        assert len(asyncio.run(asyncio.wait_for(_one(runner, ids), 30))) == GREEDY.max_tokens
    finally:
        runner.close()


def test_a_runner_whose_steps_keep_raising_fails_the_health_check(model):
    """Every step raising, requests one at a time (the engine idle in between, so no 'wedged' clock runs): each
    ends with RequestFailed, and the health check must fail so that Serve replaces the replica, which otherwise
    failed every request while reporting healthy. One good step later, it is healthy again."""
    engine, runner, ids = _runner(model)
    core = _core(runner)
    try:
        core.healthy()
        for _ in range(2):
            with pytest.raises(RequestFailed):
                asyncio.run(asyncio.wait_for(_one(runner, ids), 30))
            asyncio.run(asyncio.sleep(0.2))
        assert runner._thread.is_alive()
        with pytest.raises(RuntimeError, match="steps keep failing"):
            core.healthy()
        engine.broken = False
        assert len(asyncio.run(asyncio.wait_for(_one(runner, ids), 30))) == GREEDY.max_tokens
        core.healthy()
    finally:
        runner.close()
