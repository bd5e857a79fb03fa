"""The gateway's engine gauges (elasticmoe_running_seqs, _queued_seqs, _kv_cache_usage) once its engine runs out of
work, and with a KV-cache slot held back for zeroing: a real EngineRunner over the tiny Mixtral of
tests/test_runner.py, its hooks wired as GatewayCore wires them."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.engine.engine import Engine
from tests.test_runner import GREEDY, PROMPTS, model, reference  # noqa: F401 - fixtures
from tests.test_runner_request_faults import zeroing_fails_once


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


def test_a_slot_held_back_for_zeroing_is_used_not_free(model, reference):  # noqa: F811
    """A slot whose zeroing raised as its request ended (a device error) is held back until the next step zeroes it:
    neither free nor any sequence's. elasticmoe_kv_cache_usage was running / (running + free slots), the held slot
    left out of both: it read 0.0 with that slot unusable (and 1.0 with every other slot running, of one slot fewer).
    It is now the share of slots not free, the held one counted used (as the gauge's help says), and stats() says
    how many are held: running + free_slots + held_slots is every slot. The next step zeroes it: all free again."""
    _, llm = reference
    runner, metrics = _gateway_runner(model)
    engine, total = runner.engine, runner.engine.cache.num_slots
    zeroed = zeroing_fails_once(engine)

    async def first_token_then_leave() -> None:
        stream = runner.generate("quitter", llm.encode(PROMPTS[0]), GREEDY)
        await stream.__anext__()
        await stream.aclose()  # aborted: its zeroing raises, its slot is held back; the engine runs out of work

    async def one(p: str) -> None:
        async for _ in runner.generate("next", llm.encode(p), GREEDY):
            pass
    try:
        asyncio.run(first_token_then_leave())
        _wait_for(lambda: engine.held_slots and metrics.gauges.get("kv_usage") == 1 / total)
        assert list(engine.held_slots) == zeroed and total > 1
        assert metrics.gauges == {"running": 0, "queued": 0, "kv_usage": 1 / total}
        st = runner.stats()
        assert (st["running"], st["free_slots"], st["held_slots"]) == (0, total - 1, 1)
        asyncio.run(one(PROMPTS[1]))  # its step zeroes the held slot first
        _wait_for(lambda: metrics.gauges.get("kv_usage") == 0.0)
        assert engine.held_slots == {} and metrics.gauges == {"running": 0, "queued": 0, "kv_usage": 0.0}
        assert (runner.stats()["free_slots"], runner.stats()["held_slots"]) == (total, 0)
    finally:
        runner.close()


def test_kv_usage_counts_reserved_blocks_when_they_run_out_before_slots():
    """With a paged cache, admission stops when blocks run out, slots free or not: one sequence of 8 slots whose
    prompt holds 6 of 8 blocks reads 0.75 (slots alone: 0.125), and the gauge falls back to 0 when it ends."""
    from elasticmoe.engine.kv_blocks import BlockPool
    from elasticmoe.engine.sampling import SamplingParams
    from elasticmoe.engine.scheduler import Scheduler, Sequence, Status

    metrics = GatewayMetrics("off", 2, 4, [1], use_ray=False)
    sched = Scheduler(8, 64, 4, BlockPool(8, 4))
    seq = Sequence("a", list(range(24)), SamplingParams(max_tokens=4))  # a prompt of 24: 6 blocks of 4
    sched.add(seq)
    assert [s for s, _ in sched.schedule()] == [seq] and sched.pool.num_free == 2
    metrics.engine_from(sched)
    assert metrics.gauges == {"running": 1, "queued": 0, "kv_usage": 0.75}
    b = Sequence("b", list(range(24)), SamplingParams(max_tokens=4))
    sched.add(b)
    assert all(s is not b for s, _ in sched.schedule()) and b.status is Status.WAITING  # 6 blocks, 2 free: waits
    metrics.engine_from(sched)
    assert metrics.gauges == {"running": 1, "queued": 1, "kv_usage": 0.75}
    sched.finish(seq, "stop")
    metrics.engine_from(sched)
    assert metrics.gauges == {"running": 0, "queued": 1, "kv_usage": 0.0}
