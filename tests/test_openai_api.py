"""The OpenAI HTTP API over a real engine (in-process experts) and uvicorn, called with the official client: what it
answers (models, completions and chat equal to the engine, streams, stop strings, logprobs, request metrics).
Its refusals and aborts: tests/test_openai_errors.py."""

from __future__ import annotations

import openai
import pytest

from tests.openai_util import CHAT, MODEL, PROMPT, _greedy
from tests.openai_util import llm, model, served  # noqa: F401 - fixtures


def _chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def test_models_lists_the_served_model(served, model):
    _, client = served
    assert [m.id for m in client.models.list().data] == ["mixtral"]  # the directory's name, never its path
    out = client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=1)
    assert out.model == "mixtral" and model[0] not in out.model_dump_json()


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_greedy_equals_engine(served, llm, as_ids):
    _, client = served
    ids = llm.encode(PROMPT)
    ref = _greedy(llm, ids, 12, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=ids if as_ids else PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_stream_equals_engine_and_reports_usage(served, llm):
    _, client = served
    ids = llm.encode(PROMPT)
    ref = _greedy(llm, ids, 20, ignore_eos=True)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_engine_on_the_chat_template(served, llm, stream):
    _, client = served
    ref = _greedy(llm, _chat_ids(llm.tokenizer, CHAT), 10, ignore_eos=True)
    kw = dict(model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = client.chat.completions.create(**kw)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
        assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(ref.prompt_token_ids)
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_default_max_tokens_fills_the_context(served):
    _, client = served
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == 128 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(served, llm, stream):
    _, client = served
    full = _greedy(llm, llm.encode(PROMPT), 20, ignore_eos=True).text
    stop = full[6:9]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[: full.find(stop)] and finish == "stop"


def test_completion_logprobs_shape(served):
    _, client = served
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_completion_top_logprobs_hold_the_sampled_token(served, stream):
    """As OpenAI documents (and vLLM answers): the sampled token is always among top_logprobs, so up to logprobs + 1
    entries; logprobs: 0 gives the sampled token alone, not {}."""
    _, client = served
    for n, kw in ((0, {"temperature": 0}), (1, {"temperature": 1.0, "seed": 3})):
        args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, logprobs=n, stream=stream, **kw)
        chunks = list(client.completions.create(**args)) if stream else [client.completions.create(**args)]
        lps = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        tokens = [t for lp in lps for t in lp.tokens]
        token_lps = [v for lp in lps for v in lp.token_logprobs]
        tops = [top for lp in lps for top in lp.top_logprobs]
        assert len(tokens) == len(tops) == 12
        for token, v, top in zip(tokens, token_lps, tops):
            assert 1 <= len(top) <= n + 1 and top[token] == pytest.approx(v)
        if n == 0:
            assert tops == [{t: v} for t, v in zip(tokens, token_lps)]
        else:  # sampling at temperature 1 sometimes picks a token outside the top one: then both are there
            assert any(len(top) == 2 for top in tops)


def test_chat_logprobs_shape(served):
    _, client = served
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:  # greedy: the sampled token is the most likely one
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert isinstance(t.bytes, list) and t.bytes


def test_requests_are_counted_in_metrics(served):
    core, client = served
    before = dict(core.metrics.requests), dict(core.metrics.latency_counts)
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=-1)
    assert core.metrics.requests[("http", "ok")] == before[0].get(("http", "ok"), 0) + 1
    assert core.metrics.requests[("http", "invalid")] == before[0].get(("http", "invalid"), 0) + 1
    assert core.metrics.latency_counts["e2e"] == before[1]["e2e"] + 1
