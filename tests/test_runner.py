"""EngineRunner and Engine under faults: per-request isolation, step retries, non-blocking admission, cancellation.

A real engine over a tiny Mixtral written by transformers, experts in-process (LocalDispatcher). Faults are
injected into our own dispatcher seam (a wrapper that raises ExpertsUnavailable) or into a request's own
parameters; every surviving request's tokens are compared with `LLM.generate` run alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.scheduler import QueueFull, RequestFailed
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from tests.store_util import FussyTokenizer, tiny_mixtral

PROMPTS = ["The expert said", "Once upon a time", "Mixture of experts routes", "A B C D"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class FaultyDispatcher(LocalDispatcher):
    """In-process experts; raises ExpertsUnavailable on the dispatches that `fail(n_tokens)` selects."""

    def __init__(self, store, fail=lambda calls, tokens: False, delay_s: float = 0.0):
        super().__init__(store)
        self.fail, self.delay_s, self.calls, self.raised = fail, delay_s, 0, 0

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail(self.calls, hidden.shape[0]):
            self.raised += 1
            raise ExpertsUnavailable(f"injected: layer {layer}, {hidden.shape[0]} tokens")
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


class GatedDispatcher(LocalDispatcher):
    """In-process experts; once `armed`, a dispatch holds the engine inside its step until `release` is set."""

    def __init__(self, store):
        super().__init__(store)
        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if self.armed:
            self.entered.set()
            self.release.wait(30)
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


class NanDispatcher(LocalDispatcher):
    """In-process experts whose outputs are NaN while `poisoned` (a numerical fault upstream)."""

    poisoned = False

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        pending = super().dispatch(layer, hidden, topk_ids, topk_weights)
        if not self.poisoned:
            return pending
        out = pending.wait() * float("nan")
        return SimpleNamespace(wait=lambda: out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_mixtral(tmp_path_factory.mktemp("rn"))


@pytest.fixture(scope="module")
def reference(model):
    """Each prompt's greedy tokens from LLM.generate, one request at a time."""
    llm = LLM(model[0])
    return {p: llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS}, llm


def _runner(model, dispatcher, **kw) -> EngineRunner:
    _, files, _ = model
    kw.setdefault("retry_backoff_s", (0.0, 0.01, 0.02))
    return EngineRunner(Engine(files, dispatcher, max_model_len=128, **kw))


async def _collect(runner: EngineRunner, ids: list[int], params: SamplingParams) -> list[int]:
    out: list[int] = []
    async for u in runner.generate("r", ids, params):
        out += u.token_ids
    return out


async def _all(runner, reqs) -> list:
    return await asyncio.gather(*(_collect(runner, ids, p) for ids, p in reqs), return_exceptions=True)


def _poisoned(params: SamplingParams, **fields) -> SamplingParams:
    """params with fields set past validation: a request the sampler cannot serve (fault injection)."""
    p = dataclasses.replace(params)
    for k, v in fields.items():
        object.__setattr__(p, k, v)
    return p


def test_poison_temperature_is_rejected_at_admission(model, reference):
    runner = _runner(model, LocalDispatcher(model[2]))
    try:
        with pytest.raises(InvalidRequest) as e:
            SamplingParams(temperature=1e-45)
        assert e.value.field == "temperature"
        with pytest.raises(InvalidRequest, match="temperature"):
            runner.generate("x", [1, 2, 3], _poisoned(GREEDY, temperature=1e-45))
        assert SamplingParams(temperature=1e-6).greedy and not SamplingParams(temperature=1e-4).greedy
    finally:
        runner.close()


def test_a_request_the_sampler_cannot_serve_ends_alone(model, reference):
    """temperature NaN forced past validation: NaN probabilities end that request only (RequestFailed);
    four greedy neighbours in the same steps finish with exactly their reference tokens."""
    ref, llm = reference
    runner = _runner(model, LocalDispatcher(model[2]))
    bad = _poisoned(SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), temperature=float("nan"))
    runner.engine.validate = lambda ids, p, resume=None: None  # admit the poison (the validator would refuse it)
    try:
        reqs = [(llm.encode(p), GREEDY) for p in PROMPTS] + [(llm.encode("poison"), bad)]
        out = asyncio.run(_all(runner, reqs))
        assert isinstance(out[4], RequestFailed)
        assert out[:4] == [ref[p] for p in PROMPTS]
        assert runner.engine.failed_requests == 1
        assert runner.stats()["admitted"] == 0 and runner.stats()["free_slots"] == 16
    finally:
        runner.close()


def test_the_slot_of_a_request_failed_by_nan_serves_the_next_request_exactly(model, reference):
    """A request whose experts gave NaN fails alone, and leaves no NaN K/V behind: the next request in its slot
    decodes beside a longer one (so its masked attention spans the failed request's old positions) and gets
    exactly its reference tokens."""
    ref, llm = reference
    disp = NanDispatcher(model[2])
    engine = Engine(model[1], disp, max_model_len=128)

    def run(prompts):
        seqs = [engine.add_request(str(i), llm.encode(p), GREEDY) for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        return seqs

    disp.poisoned = True
    [bad] = run([" ".join(["experts"] * 20)])
    assert isinstance(bad.error, RequestFailed)
    disp.poisoned = False
    short, longer = run([PROMPTS[3], PROMPTS[2]])
    assert short.slot == bad.slot and len(short.prompt_ids) < len(longer.prompt_ids) < len(bad.prompt_ids)
    assert (short.error, longer.error) == (None, None)
    assert [short.output_ids, longer.output_ids] == [ref[PROMPTS[3]], ref[PROMPTS[2]]]
    assert engine.failed_requests == 1


def test_a_step_whose_experts_fail_once_is_retried_and_tokens_stay_exact(model, reference):
    ref, llm = reference
    disp = FaultyDispatcher(model[2], fail=lambda calls, tokens: calls in (7, 8, 20))
    runner = _runner(model, disp)
    try:
        out = asyncio.run(_all(runner, [(llm.encode(p), GREEDY) for p in PROMPTS]))
        assert out == [ref[p] for p in PROMPTS]
        assert disp.raised == 3 and runner.engine.step_retries == 3 and runner.engine.failed_requests == 0
    finally:
        runner.close()


def test_experts_that_stay_unavailable_end_only_the_requests_that_need_them(model, reference):
    """Every dispatch of >= 20 tokens fails: the long prompt's prefill can never run, so after the retries it
    alone ends (RequestFailed, i.e. UNAVAILABLE / 503); the short requests run on exactly."""
    ref, llm = reference
    disp = FaultyDispatcher(model[2], fail=lambda calls, tokens: tokens >= 20)
    runner = _runner(model, disp)
    try:
        long = llm.encode(" ".join(["experts"] * 30))
        assert len(long) >= 20
        reqs = [(llm.encode(p), GREEDY) for p in PROMPTS] + [(long, GREEDY)]
        out = asyncio.run(_all(runner, reqs))
        assert isinstance(out[4], RequestFailed) and "experts are unavailable" in str(out[4])
        assert out[:4] == [ref[p] for p in PROMPTS]
        assert runner.engine.failed_requests == 1 and runner.stats()["admitted"] == 0
    finally:
        runner.close()


def test_admission_never_waits_for_a_step_and_a_full_gateway_answers_at_once(model, reference):
    """generate() admits or refuses while the engine thread is held inside a step: the step count is the same
    before and after both calls: a call that waited for the step would wait until the release (30 s) and see the
    count move. (Timing the calls against 0.05 s, as before, depended on the thread not being descheduled.)"""
    _, llm = reference
    disp = GatedDispatcher(model[2])
    runner = _runner(model, disp, max_num_seqs=1, max_queue=1)

    async def go():
        first = runner.generate("a", llm.encode(PROMPTS[0]), GREEDY)
        await first.__anext__()  # running
        disp.armed = True
        assert await asyncio.to_thread(disp.entered.wait, 30)  # the engine thread is inside a step, held there
        steps = runner.stats()["steps"]
        queued = runner.generate("b", llm.encode(PROMPTS[1]), GREEDY)
        with pytest.raises(QueueFull):
            runner.generate("c", llm.encode(PROMPTS[2]), GREEDY)
        held = runner.stats()["steps"] == steps
        disp.armed = False
        disp.release.set()
        await first.aclose()
        await queued.aclose()
        return held

    try:
        assert asyncio.run(go()), "an admission waited for the step in progress"
    finally:
        disp.release.set()
        runner.close()


def test_a_refusal_by_the_schedulers_own_bound_is_counted_as_refused(model, reference):
    """The runner's bound (its capacity, taken when it starts) admits a request that the scheduler's own bound
    refuses when the engine was handed over with a request of its own queued: the caller gets QueueFull, and
    `refused` (requests refused at capacity) counts it as it counts the runner's own refusals."""
    _, llm = reference
    _, files, store = model
    engine = Engine(files, FaultyDispatcher(store, delay_s=0.05), max_model_len=128, max_num_seqs=1, max_queue=0)
    engine.add_request("offline", llm.encode(PROMPTS[0]), SamplingParams(max_tokens=40, temperature=0,
                                                                            ignore_eos=True))
    runner = EngineRunner(engine)  # capacity 1: the slot; the request queued before it is not the runner's

    async def go():
        with pytest.raises(QueueFull, match="request queue is full"):
            await _collect(runner, llm.encode(PROMPTS[1]), GREEDY)

    try:
        asyncio.run(go())
        assert runner.stats()["refused"] == 1 and runner.stats()["admitted"] == 0
    finally:
        runner.close()


def test_a_request_cancelled_during_admission_frees_its_slot(model, reference):
    """The caller is cancelled before its request produced anything (still queued behind a slow step): the
    request is aborted, its admission released, and the engine never runs it to max_tokens."""
    ref, llm = reference
    disp = FaultyDispatcher(model[2], delay_s=0.05)
    runner = _runner(model, disp, max_num_seqs=2, max_queue=0)

    async def go():
        busy = runner.generate("busy", llm.encode(PROMPTS[0]), SamplingParams(max_tokens=100, temperature=0,
                                                                               ignore_eos=True))
        await busy.__anext__()
        task = asyncio.ensure_future(_collect(runner, llm.encode(PROMPTS[1]), GREEDY))
        await asyncio.sleep(0)  # admitted, not yet stepped
        assert runner.stats()["admitted"] == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while runner.stats()["admitted"] != 1 or runner.stats()["running"] != 1:
            assert time.monotonic() < deadline, runner.stats()
            await asyncio.sleep(0.01)
        disp.delay_s = 0.0
        third = await _collect(runner, llm.encode(PROMPTS[2]), GREEDY)  # the freed place is usable
        await busy.aclose()
        return third

    try:
        assert asyncio.run(go()) == ref[PROMPTS[2]]
        deadline = time.monotonic() + 5
        while runner.stats()["running"] or runner.stats()["admitted"]:
            assert time.monotonic() < deadline, runner.stats()
            time.sleep(0.01)
        assert runner.stats()["free_slots"] == 2
    finally:
        runner.close()


def test_a_slow_reader_gets_every_token_in_one_bounded_buffer(model, reference):
    ref, llm = reference
    runner = _runner(model, LocalDispatcher(model[2]))

    async def go():
        stream = runner.generate("slow", llm.encode(PROMPTS[3]), GREEDY)
        await asyncio.sleep(0.5)  # the engine finishes all 12 tokens meanwhile
        updates = [u async for u in stream]
        return updates

    try:
        updates = asyncio.run(go())
        assert len(updates) == 1 and updates[0].finished  # merged into one pending update
        assert list(updates[0].token_ids) == ref[PROMPTS[3]] and updates[0].completion_tokens == 12
    finally:
        runner.close()


def test_a_tokenizer_failure_on_one_output_ends_that_request_alone(model, reference):
    """A request forced (logit_bias) onto a token its tokenizer cannot decode, no stop strings: it alone ends
    (RequestFailed); the engine thread lives on and its neighbours finish with their reference tokens."""
    ref, llm = reference
    prompts = [llm.encode(p) for p in PROMPTS]
    bad = min(set(range(100, 400)) - {t for p in PROMPTS for t in ref[p]} - {t for ids in prompts for t in ids})
    _, files, store = model
    engine = Engine(files, LocalDispatcher(store), max_model_len=128,
                    tokenizer=FussyTokenizer(llm.tokenizer, bad))
    runner = EngineRunner(engine)
    forced = dataclasses.replace(GREEDY, logit_bias={bad: 100.0})

    async def go():
        return await asyncio.wait_for(_all(runner, [(ids, GREEDY) for ids in prompts] + [(prompts[0], forced)]), 30)

    try:
        out = asyncio.run(go())
        assert isinstance(out[4], RequestFailed)
        assert out[:4] == [ref[p] for p in PROMPTS]
        assert runner._thread.is_alive() and runner.stats()["admitted"] == 0 and runner.stats()["free_slots"] == 16
    finally:
        runner.close()


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def test_close_ends_every_admitted_request_and_refuses_later_ones(model, reference):
    """close() while the engine is inside a step, one request running and one admitted that the engine has not
    seen yet (still in its inbox): both end with RequestFailed, none waits forever; a later one is refused."""
    _, llm = reference
    disp = GatedDispatcher(model[2])
    runner = _runner(model, disp)
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def go():
        busy = runner.generate("busy", llm.encode(PROMPTS[0]), long)
        await busy.__anext__()
        disp.armed = True
        assert await asyncio.to_thread(disp.entered.wait, 30)  # the engine thread is inside a step
        late = runner.generate("late", llm.encode(PROMPTS[1]), GREEDY)  # admitted, in the inbox
        closer = threading.Thread(target=runner.close)
        closer.start()
        while not runner._stop:
            await asyncio.sleep(0.01)
        disp.release.set()  # the step ends after close() began
        await asyncio.to_thread(closer.join, 30)
        for stream in (busy, late):
            with pytest.raises(RequestFailed, match="shutting down"):
                await asyncio.wait_for(_drain(stream), 30)
        with pytest.raises(RequestFailed, match="shutting down"):
            runner.generate("after", llm.encode(PROMPTS[2]), GREEDY)
        assert runner.stats()["admitted"] == 0

    try:
        asyncio.run(go())
    finally:
        disp.release.set()
        runner.close()


def test_a_failing_step_hook_costs_no_request(model, reference):
    """The per-step hook (the gateway's step log and Ray gauges) raising must not end the engine thread: every
    request still finishes with its reference tokens, and the runner keeps admitting."""
    ref, llm = reference
    calls = []

    def hook(seconds: float, n: int) -> None:
        calls.append(n)
        if len(calls) in (2, 5):
            raise RuntimeError("injected: the metrics exporter failed")

    runner = _runner(model, LocalDispatcher(model[2]))
    runner.on_step = hook
    try:
        out = asyncio.run(_all(runner, [(llm.encode(p), GREEDY) for p in PROMPTS]))
        assert out == [ref[p] for p in PROMPTS] and len(calls) > 5 and runner.hook_errors == 2
        assert asyncio.run(_all(runner, [(llm.encode(PROMPTS[0]), GREEDY)])) == [ref[PROMPTS[0]]]
    finally:
        runner.close()
