"""The offline LLM's client going away: Ctrl-C (KeyboardInterrupt) in LLM.generate as its prompts are queued, while
some wait for a slot, during a prefill and mid-decode. Each interrupt is raised where the test says (at the start
of the first step in that state, or just as the engine queued a prompt); then no request of the call is left in the
engine (its slots free, their K/V zeroed) and the next call's tokens are exactly those of a fresh engine.

Real engine and experts in-process (a tiny Mixtral written by transformers); faults are raised from our own seams
(the dispatcher's begin_step hook, the engine's add_request and its scheduler's add), as tests/test_engine_faults.py
does."""

from __future__ import annotations

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.scheduler import Status
from elasticmoe.model.dispatch import LocalDispatcher
from tests.cancel_util import K, NEIGHBOUR, VICTIM
from tests.openai_util import llm, model  # noqa: F401 - module-scoped fixtures

PROMPTS = [VICTIM, "The expert said", "Once upon a time", "A B C D", "Mixture of experts routes", "Hello"]
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
WHEN = {  # the state of the engine's sequences, (status, tokens cached, prompt length, tokens out) each, at the
    # start of the step where Ctrl-C comes
    "queued": lambda seen: any(st is Status.WAITING for st, *_ in seen) and any(out for *_, out in seen),
    "prefill": lambda seen: any(st is Status.RUNNING and 0 < c < p for st, c, p, _ in seen),
    "decode": lambda seen: any(out >= K for *_, out in seen),
}


class CtrlC(LocalDispatcher):
    """In-process experts; KeyboardInterrupt at the start of the first step (scheduled, nothing run yet) in which
    `when` holds of the sequences' state. `seqs`, `seen`: the sequences then, and their state."""

    def __init__(self, llm: LLM, when):  # noqa: F811
        super().__init__(llm.store)
        self.engine, self.when, self.seqs, self.seen = llm.engine, when, [], []

    def begin_step(self) -> None:
        seqs = list(self.engine.seqs.values())
        seen = [(s.status, s.num_cached, len(s.prompt_ids), len(s.output_ids)) for s in seqs]
        if not self.seqs and self.when(seen):
            self.seqs, self.seen = seqs, seen
            raise KeyboardInterrupt


@pytest.fixture
def fresh(model):  # noqa: F811
    """An LLM of 2 slots and 16 tokens a step (a long prompt's prefill takes several), made for one test."""
    return LLM(model[0], max_num_seqs=2, max_num_batched_tokens=16)


def _clean(llm: LLM) -> None:  # noqa: F811
    """Nothing of the interrupted call is left: no sequence, every slot free."""
    engine = llm.engine
    assert engine.seqs == {} and not engine.has_work() and engine.scheduler.num_free_slots == 2


def _same_as_alone(fresh: LLM, llm: LLM) -> None:  # noqa: F811
    """The next call runs only its own prompt, with the tokens a fresh engine gives it."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    steps = fresh.engine.steps
    [out] = fresh.generate([NEIGHBOUR], params)
    assert out.token_ids == llm.generate([NEIGHBOUR], params)[0].token_ids
    assert fresh.engine.steps - steps == len(out.token_ids)  # one prefill, then a decode a token: nothing else


@pytest.mark.parametrize("stage", sorted(WHEN))
def test_ctrl_c_at_each_stage_leaves_nothing_in_the_engine(fresh, llm, stage):  # noqa: F811
    fresh.engine.dispatcher = CtrlC(fresh, WHEN[stage])
    with pytest.raises(KeyboardInterrupt):
        fresh.generate(PROMPTS, LONG)
    ctrl_c = fresh.engine.dispatcher
    assert WHEN[stage](ctrl_c.seen) and len(ctrl_c.seqs) == len(PROMPTS)  # it came there, every prompt queued
    _clean(fresh)
    cache = fresh.engine.cache
    for s, (*_, n) in zip(ctrl_c.seqs, ctrl_c.seen):  # aborted where it stood: its step never ran
        assert s.finish_reason == "abort" and len(s.output_ids) == n
        if s.slot >= 0:
            assert all(not cache.of_slot(t, s.slot).any() for layer in cache.layers for t in layer), "its K/V were kept"
    fresh.engine.dispatcher = LocalDispatcher(fresh.store)
    _same_as_alone(fresh, llm)


@pytest.mark.parametrize("where", ["as_the_scheduler_queues_it", "as_add_request_returns"])
def test_ctrl_c_as_a_prompt_is_queued_leaves_nothing_in_the_engine(fresh, llm, monkeypatch, where):  # noqa: F811
    """Ctrl-C just as the engine queued the third prompt: inside Engine.add_request, once the scheduler had it
    (the engine did not list it yet), or once add_request returned (generate did not list it yet). Either way
    nobody aborted it, and the next call ran it (to max_tokens) before its own prompt; now it is aborted."""
    engine, calls = fresh.engine, []
    target = (engine.scheduler, "add") if where == "as_the_scheduler_queues_it" else (engine, "add_request")
    real = getattr(*target)

    def then_ctrl_c(*args, **kw):
        out = real(*args, **kw)
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(*target, then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fresh.generate(PROMPTS, LONG)
    assert len(calls) == 3 and engine.steps == 0  # interrupted while queueing: nothing ran
    monkeypatch.undo()
    _clean(fresh)
    _same_as_alone(fresh, llm)
