"""A request whose caller's event loop closed with its stream still open (never read to the end, never closed): no
one can read or close it, so the runner aborts it. A real engine over a tiny Mixtral, experts in-process."""

from __future__ import annotations

import asyncio
import time

import pytest

from elasticmoe import SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import LocalDispatcher
from tests.test_admission import model  # noqa: F401 - a fixture: a tiny Mixtral with every expert loaded

LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("read_first", [True, False])
def test_a_request_whose_callers_loop_closed_is_aborted_not_run_to_max_tokens(model, read_first):  # noqa: F811
    """asyncio.run() returns with the request's stream open (a caller that forgot aclose, a server loop stopped with
    calls in flight). Before, the engine ran it to its 100 tokens for no one, holding its KV slot and its place in
    the gateway all along; now it is aborted at its next update and both are free again."""
    _, files, store = model
    engine = Engine(files, LocalDispatcher(store), max_model_len=128, max_num_seqs=2)
    runner = EngineRunner(engine)
    ids = engine.tokenizer.encode("Once upon a time")

    async def forgotten():
        stream = runner.generate("forgotten", ids, LONG)
        if read_first:
            await stream.__anext__()  # its first token came: it is running (and cannot have finished)
            return engine.seqs[stream.key]
        return stream.key

    try:
        got = asyncio.run(forgotten())
        deadline = time.monotonic() + 120  # a bound on the wait, not a timing: aborted, it ends within a step or two
        while runner.stats()["admitted"]:
            assert time.monotonic() < deadline, runner.stats()
            time.sleep(0.02)
        assert runner.stats()["running"] == 0 and engine.scheduler.num_free_slots == 2 and engine.seqs == {}
        if read_first:
            assert got.finish_reason == "abort" and len(got.output_ids) < LONG.max_tokens, (got.finish_reason,
                                                                                          len(got.output_ids))
        assert engine.steps < LONG.max_tokens, engine.steps

        async def after():
            return [u async for u in runner.generate("after", ids, SHORT)]

        assert asyncio.run(after())[-1].completion_tokens == SHORT.max_tokens  # the runner serves on
    finally:
        runner.close()
