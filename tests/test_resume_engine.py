"""A stream resumed on another engine (resume.Resume: the client's tokens and text so far) continues exactly as the
uninterrupted run: the same tokens, text (the client's text + the resumed deltas), logprobs, finish reason and
completion count, greedy and seeded sampling, with a stop string and penalties; resume fields that no stream could
have sent are refused naming the field."""

from __future__ import annotations

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.resume import Resume
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.model.tiny import make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
KINDS = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, seed=7, top_p=0.95, top_k=40)}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("resume") / "m", layers=2, experts=4)))


def _run(engine, rid: str, ids: list[int], sp: SamplingParams, resume: Resume | None = None):
    """Steps the request alone to its end: (sequence, [(output tokens so far, streamed text so far)] per step)."""
    seq, text, seen = engine.add_request(rid, ids, sp, resume), "", []
    while engine.has_work():
        for s in engine.step():
            text += engine.text_delta(s)
            seen.append((list(s.output_ids), text))
    return seq, seen


def _params(llm, kind: str) -> SamplingParams:
    """32 tokens with penalties and logprobs; a stop string from the text of its tokens 12 on (the run stops there)."""
    base = dict(max_tokens=32, ignore_eos=True, logprobs=2, repetition_penalty=1.2, presence_penalty=0.3,
                **KINDS[kind])
    free = _run(llm.engine, f"free-{kind}", llm.encode(PROMPT), SamplingParams(**base))[0]
    head = len(llm.engine.tokenizer.decode(free.output_ids[:12], skip_special_tokens=True))
    stop = free.text[head + 2:head + 5]
    assert len(stop) == 3 and stop not in free.text[:head], free.text
    return SamplingParams(**base, stop=(stop,))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_resumed_stream_continues_as_the_uninterrupted_one(llm, kind):
    sp, ids, engine = _params(llm, kind), llm.encode(PROMPT), llm.engine
    full, steps = _run(engine, f"full-{kind}", ids, sp)
    assert full.finish_reason == "stop" and len(full.output_ids) > 12, full
    for k in (1, 5, len(full.output_ids) - 1):
        tokens, text = steps[k - 1]
        assert len(tokens) == k
        seq, rest = _run(engine, f"resumed-{kind}-{k}", ids, sp, Resume(tuple(tokens), len(text)))
        assert seq.output_ids == full.output_ids, (kind, k)
        assert text + rest[-1][1] == full.text and seq.text == full.text, (kind, k)
        assert (seq.finish_reason, len(seq.output_ids)) == (full.finish_reason, len(full.output_ids))
        new, want = seq.logprobs[k:], full.logprobs[k:]
        assert seq.logprobs[:k] == [None] * k  # the client has those
        assert [(x.token_id, [t for t, _ in x.top]) for x in new] == [(x.token_id, [t for t, _ in x.top]) for x in want]
        assert max(abs(x.logprob - y.logprob) for x, y in zip(new, want)) < 1e-4
    assert not engine.seqs and engine.scheduler.num_free_slots == engine.scheduler.num_slots


def test_resume_fields_no_stream_could_send_are_refused(llm):
    engine, ids = llm.engine, llm.encode(PROMPT)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    full, steps = _run(engine, "full", ids, sp)
    eos = sorted(engine.eos_ids)[0]
    stop = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop=(full.text[1:3],))
    cases = [(sp, Resume(tuple(full.output_ids)), "resume.token_ids"),  # as many as max_tokens: it had ended
             (sp, Resume((1, engine.spec.vocab_size)), "resume.token_ids[1]"),
             (sp, Resume((1, -1)), "resume.token_ids[1]"),
             (sp, Resume((), 3), "resume.text_chars"),
             (sp, Resume((1,), -1), "resume.text_chars"),
             (sp, Resume(tuple(full.output_ids[:4]), len(steps[3][1]) + 1), "resume.text_chars"),
             (SamplingParams(max_tokens=8, temperature=0.0), Resume((3, eos)), "resume.token_ids[1]"),
             (stop, Resume(tuple(full.output_ids[:7])), "resume.token_ids")]
    for params, resume, field in cases:
        with pytest.raises(InvalidRequest) as e:
            engine.add_request("bad", ids, params, resume)
        assert e.value.field == field, (resume, str(e.value))
        assert not engine.seqs and not engine.has_work()
