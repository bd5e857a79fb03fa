"""The gateway's engine gauges (elasticmoe_running_seqs, _queued_seqs, _kv_cache_usage) once its engine runs out of
work: a real EngineRunner over the tiny Mixtral of tests/test_runner.py, its hooks wired as GatewayCore wires them."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.engine.engine import Engine
from tests.test_runner import GREEDY, PROMPTS, model, reference  # noqa: F401 - fixtures


def _gateway_runner(model):  # noqa: F811
    """A runner whose steps set the gauges at most twice a second and whose idle hook sets them once more, as in
    GatewayCore."""
    _, files, store = model
    spec = files.spec
    metrics = GatewayMetrics("per_expert", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers, use_ray=False)
    engine = Engine(files, LocalDispatcher(store), max_model_len=128)
    last = [0.0]

    def on_step(seconds: float, n: int) -> None:
        if time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            metrics.engine_from(engine.scheduler)

    return EngineRunner(engine, on_step=on_step, on_idle=lambda: metrics.engine_from(engine.scheduler)), metrics


def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_gauges_read_idle_once_every_request_ended(model, reference):  # noqa: F811
    """Finished requests: the last throttled step showed them running, and with no step after it the gauges kept
    saying so (running 4, KV cache in use) for as long as the gateway sat idle."""
    _, llm = reference
    runner, metrics = _gateway_runner(model)

    async def run_all() -> None:
        async def one(p: str) -> None:
            async for _ in runner.generate("r", llm.encode(p), GREEDY):
                pass
        await asyncio.gather(*(one(p) for p in PROMPTS))

    try:
        asyncio.run(run_all())
        _wait_for(lambda: metrics.gauges.get("running") == 0)
        assert metrics.gauges == {"running": 0, "queued": 0, "kv_usage": 0.0}
    finally:
        runner.close()


def test_gauges_read_idle_after_the_last_request_is_cancelled(model, reference):  # noqa: F811
    """A client that goes away frees its slot without a step: the gauges follow."""
    _, llm = reference
    runner, metrics = _gateway_runner(model)
    runner.on_step = lambda seconds, n: metrics.engine_from(runner.engine.scheduler)  # every step

    async def first_token_then_leave() -> None:
        stream = runner.generate("r", llm.encode(PROMPTS[0]), GREEDY)
        await stream.__anext__()
        await stream.aclose()

    try:
        asyncio.run(first_token_then_leave())
        _wait_for(lambda: metrics.gauges.get("running") == 0)
        assert metrics.gauges == {"running": 0, "queued": 0, "kv_usage": 0.0}
    finally:
        runner.close()
