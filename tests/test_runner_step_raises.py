"""A step that raises after its forward ended requests (a device error as its rows are drawn, or as the forward joins
the rows of its runs): the requests it had ended still end for their clients. A real engine over a tiny Mixtral
(experts in-process); faults injected into the dispatcher seam, the engine's draw and its forward's joining."""

from __future__ import annotations

import asyncio

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from tests.test_admission import model  # noqa: F401 - a fixture: a tiny Mixtral with every expert loaded

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SHORT, LONG = "A B C", "Once upon a time there was"


class LongFails(LocalDispatcher):
    """In-process experts; a run carrying the long prompt's prefill (`tokens` tokens or more) fails as no retry would
    mend, so the engine ends that request in its forward and keeps the rest of the step."""

    tokens = 1 << 30

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if hidden.shape[0] >= self.tokens:
            e = ExpertsUnavailable(f"injected: {hidden.shape[0]} tokens")
            e.deterministic = True
            raise e
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


class DrawFails(Engine):
    """A real engine whose draw raises outside any row (a device error), once: in the first step whose forward
    ended a request."""

    raised = False

    def step(self):
        self.failed_before = self.failed_requests
        return super().step()

    def _sample(self, hidden, seqs):
        if self.failed_requests > self.failed_before and not self.raised:
            self.raised = True
            raise RuntimeError("injected: the draw failed")
        return super()._sample(hidden, seqs)


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    llm = LLM(model[0])
    return llm, {p: llm.generate([p], GREEDY)[0].token_ids for p in (SHORT, LONG)}


async def _one(runner: EngineRunner, ids: list[int]) -> list[int]:
    out: list[int] = []
    async for u in runner.generate("r", ids, GREEDY):
        out += u.token_ids
    return out


def _both(runner: EngineRunner, llm: LLM) -> list:
    async def go():
        return await asyncio.wait_for(asyncio.gather(_one(runner, llm.encode(SHORT)), _one(runner, llm.encode(LONG)),
                                                     return_exceptions=True), 60)
    return asyncio.run(go())


def test_a_request_ended_by_a_step_that_then_raised_ends_for_its_client(model, reference):  # noqa: F811
    """The forward ends the long prompt's request (its experts fail), then the draw of the short one's row raises:
    the step's result, which carried that end, never came. Before, its client waited forever and its place stayed
    taken (admitted 1 with the engine idle); now it gets RequestFailed, and the short one its tokens as alone."""
    llm, ref = reference
    disp = LongFails(model[2])
    disp.tokens = len(llm.encode(LONG))
    assert len(llm.encode(SHORT)) < disp.tokens
    engine = DrawFails(model[1], disp, max_model_len=64)
    runner = EngineRunner(engine)
    try:
        short, long = _both(runner, llm)
        assert isinstance(long, RequestFailed), long
        assert short == ref[SHORT]
        assert engine.raised and runner.stats()["admitted"] == 0 and engine.take_unreported() == []
        assert engine.scheduler.num_free_slots == 16 and engine.seqs == {}
    finally:
        runner.close()


def _join_fails_once(engine: Engine) -> list[int]:
    """The engine's forward, whose joining of the rows of its runs raises (a device error) once, in the first step
    that ended a request (failed_requests then, listed)."""
    real, raised = engine.forward._rows, []

    def rows(parts):
        if engine.failed_requests and not raised:
            raised.append(engine.failed_requests)
            raise RuntimeError("injected: joining the step's rows failed")
        return real(parts)
    engine.forward._rows = rows
    return raised


def test_a_request_ended_by_a_forward_that_then_raised_ends_for_its_client(model, reference):  # noqa: F811
    """The forward runs the step's sequences one by one (the long prompt's experts fail as no retry would mend),
    ends the long one's request, then raises joining the rows of the runs that succeeded: the step raised from its
    forward, which no take_unreported() covered. Before, the long one's client waited forever (its place taken);
    now it gets RequestFailed at once, and the short one, whose run is repeated by the next step, its tokens."""
    llm, ref = reference
    disp = LongFails(model[2])
    disp.tokens = len(llm.encode(LONG))
    engine = Engine(model[1], disp, max_model_len=64)
    raised = _join_fails_once(engine)
    runner = EngineRunner(engine)
    try:
        short, long = _both(runner, llm)
        assert isinstance(long, RequestFailed), long
        assert short == ref[SHORT] and raised == [1] and engine.failed_requests == 1
        assert runner.stats()["admitted"] == 0 and engine.take_unreported() == [] and engine.seqs == {}
        assert engine.scheduler.num_free_slots == 16 and engine.scheduler.pool.num_free == engine.cache.num_blocks
    finally:
        runner.close()
