"""Engine faults beyond tests/test_runner.py: what a fault leaves for later requests, and how it is reported.

A real engine over a tiny Mixtral written by transformers, experts in-process; faults are injected into our own
dispatcher seam (NaN experts) or into a request's own parameters past validation, as in tests/test_runner.py.
"""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from tests.test_runner import GREEDY, PROMPTS, NanDispatcher
from tests.test_runner_request_faults import zeroing_fails_once


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("ef") / "mixtral", layers=2, experts=4)))


@pytest.fixture(scope="module")
def reference(llm):
    """Each prompt's greedy tokens from LLM.generate, one request at a time."""
    return {p: llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS}


def _run(engine: Engine, llm: LLM, reqs: list[tuple[str, SamplingParams]]) -> list:
    seqs = [engine.add_request(f"r{i}", llm.encode(p), params) for i, (p, params) in enumerate(reqs)]
    while engine.has_work():
        engine.step()
    return seqs


def test_a_logits_call_whose_forward_gave_nan_leaves_no_nan_in_its_slot(llm, reference):
    """Engine.logits (LLM.logits) runs in a free slot; a forward that gave NaN (a numerical fault in the experts)
    left its K/V there, and the next request in that slot read them (masked, yet summed) once it decoded beside a
    longer one, failing it. That request now gets exactly its reference tokens."""
    disp = NanDispatcher(llm.store)
    engine = Engine(llm.files, disp, max_model_len=128, tokenizer=llm.tokenizer)
    long_ids = llm.encode(" ".join(["experts"] * 20))
    slot = engine.scheduler.free_slots[-1]
    disp.poisoned = True
    assert engine.logits(long_ids).isnan().all()
    disp.poisoned = False
    short, longer = _run(engine, llm, [(PROMPTS[3], GREEDY), (PROMPTS[2], GREEDY)])
    assert short.slot == slot and len(short.prompt_ids) < len(longer.prompt_ids) < len(long_ids)
    assert (short.error, longer.error) == (None, None)
    assert [short.output_ids, longer.output_ids] == [reference[PROMPTS[3]], reference[PROMPTS[2]]]
    assert torch.isfinite(engine.logits(long_ids)).all()


def test_a_logits_call_whose_slot_zeroing_raises_holds_the_slot_back(llm, reference):
    """Engine.logits zeroes its slot after the forward; when that raised (a device error), the error went to the
    caller of a forward that had succeeded, and the slot stayed free with the K/V (here a numerical fault's NaN)
    that its next request read. The slot is now held back, as a request's is as it ends (Endings.release), until
    the next step zeroes it: the logits come back, and the next request in that slot gets its reference tokens."""
    disp = NanDispatcher(llm.store)
    engine = Engine(llm.files, disp, max_model_len=128, tokenizer=llm.tokenizer)
    zeroed = zeroing_fails_once(engine)
    long_ids = llm.encode(" ".join(["experts"] * 20))
    slot = engine.scheduler.free_slots[-1]
    disp.poisoned = True
    assert engine.logits(long_ids).isnan().all()
    disp.poisoned = False
    assert slot in engine.held_slots and slot not in engine.scheduler.free_slots
    short, longer = _run(engine, llm, [(PROMPTS[3], GREEDY), (PROMPTS[2], GREEDY)])
    assert zeroed == [slot, slot] and short.slot == slot  # zeroed by the first step, then given to `short`
    assert (short.error, longer.error) == (None, None)
    assert [short.output_ids, longer.output_ids] == [reference[PROMPTS[3]], reference[PROMPTS[2]]]
    assert engine.held_slots == {} and engine.scheduler.num_free_slots == engine.cache.num_slots


def test_a_seeded_request_beside_a_row_that_breaks_the_batched_sampler_keeps_its_tokens(llm):
    """When the batched sampler raised after the rows had drawn (here: a neighbour's logprobs=-1 forced past
    validation breaks the logprobs pass that follows the draws; in production e.g. running out of memory there),
    the row-by-row retry drew again from the advanced generators: a seeded request's tokens changed. The
    generators are now rewound first, so the seeded request gets the tokens it gets alone."""
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=128, tokenizer=llm.tokenizer)
    [alone] = _run(engine, llm, [(PROMPTS[0], seeded)])
    bad = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    object.__setattr__(bad, "logprobs", -1)
    engine.validate = lambda ids, p, resume=None: None  # admit the poison (the validator would refuse it)
    ok, broken = _run(engine, llm, [(PROMPTS[0], seeded), (PROMPTS[1], bad)])
    assert isinstance(broken.error, RequestFailed) and ok.error is None
    assert ok.output_ids == alone.output_ids


def test_generate_raises_naming_a_prompt_that_could_not_be_served(llm, reference, monkeypatch):
    """A prompt whose request failed (here: temperature NaN forced past validation, so its probabilities are NaN)
    came back from LLM.generate as finish_reason "abort" with no error: a failure looked like a finished output.
    As vLLM's generate raises, ours now raises RequestFailed naming the prompt and its cause; the engine is left
    clean, and the next call serves the same prompts."""
    bad = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    object.__setattr__(bad, "temperature", float("nan"))
    monkeypatch.setattr(llm.engine, "validate", lambda ids, p, resume=None: None)  # admit the poison
    with pytest.raises(RequestFailed, match=r"^prompt 1 \(offline-\d+\) could not be served: .*probability") as e:
        llm.generate(PROMPTS[:2], [GREEDY, bad])
    assert e.value.__cause__ is not None
    assert not llm.engine.has_work() and llm.engine.scheduler.num_free_slots == llm.engine.cache.num_slots
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], GREEDY)] == [reference[p] for p in PROMPTS[:2]]


class InterruptingDispatcher(LocalDispatcher):
    """In-process experts whose `after`-th call raises KeyboardInterrupt (Ctrl-C while a step runs)."""

    def __init__(self, store, after: int):
        super().__init__(store)
        self.left = after

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


def test_an_interrupted_generate_leaves_no_request_in_the_engine(llm, reference):
    """Ctrl-C in LLM.generate (KeyboardInterrupt out of a step) left its requests in the engine, holding their
    KV-cache slots: the next generate ran all of them to max_tokens before it answered, and LLM.logits found no
    free slot. They are now aborted as generate exits, and the next call runs only its own prompt."""
    fresh = LLM(str(llm.files.ckpt.path), max_num_seqs=2)
    fresh.engine.dispatcher = InterruptingDispatcher(fresh.store, after=7)  # in the fourth step
    with pytest.raises(KeyboardInterrupt):
        fresh.generate(PROMPTS * 3, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert fresh.engine.seqs == {} and not fresh.engine.has_work()
    assert fresh.engine.scheduler.num_free_slots == 2
    steps = fresh.engine.steps
    [out] = fresh.generate([PROMPTS[0]], GREEDY)
    assert out.token_ids == reference[PROMPTS[0]]
    assert fresh.engine.steps - steps == len(out.token_ids)  # one prefill, then one decode a token: nothing else
    assert fresh.logits(fresh.encode(PROMPTS[1])).shape[0] == len(fresh.encode(PROMPTS[1]))


def test_a_step_that_raised_in_sampling_is_repeated_not_lost(llm, reference, monkeypatch):
    """A step whose sampling raised as a whole (past the per-row errors it attributes: out of memory, a bug) had
    already counted its tokens as cached: the sequences it ran were never scheduled again (neither a decode nor a
    prefill left), while has_work() stayed true, so the gateway's engine loop spun on empty steps and the requests
    never ended. The step's counts are taken back: the runner's retry runs it again, and the tokens are exact."""
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=128, tokenizer=llm.tokenizer)
    real, calls = engine._sample, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 2:  # the first decode step
            raise RuntimeError("injected: sampling failed")
        return real(*args)

    monkeypatch.setattr(engine, "_sample", failing_once)
    seqs = [engine.add_request(f"r{i}", llm.encode(p), GREEDY) for i, p in enumerate(PROMPTS)]
    engine.step()
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    for _ in range(200):  # bounded: the lost sequences made this loop endless
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work() and [s.output_ids for s in seqs] == [reference[p] for p in PROMPTS]


def test_failing_an_ended_request_leaves_the_request_that_reused_its_id(llm, reference):
    """Engine.fail dropped seqs[request_id] whatever sequence it held: failing a request that had ended (aborted)
    after a new request took its id dropped the new one, which abort could then no longer find (its slot held to
    its end). Now fail drops only its own sequence: the new request stays findable and is served exactly."""
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=128, tokenizer=llm.tokenizer)
    old = engine.add_request("r", llm.encode(PROMPTS[0]), GREEDY)
    engine.step()
    engine.abort("r")
    new = engine.add_request("r", llm.encode(PROMPTS[1]), GREEDY)
    engine.fail(old, RuntimeError("late"))
    assert engine.seqs.get("r") is new
    while engine.has_work():
        engine.step()
    assert new.output_ids == reference[PROMPTS[1]] and new.error is None and engine.seqs == {}
