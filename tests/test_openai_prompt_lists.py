"""/v1/completions with several prompts in one request and with echo, as OpenAI answers them and vLLM serves them,
with the official client over uvicorn and a real engine: each prompt's choices equal the prompt sent alone (index
prompt_i * n + j, usage summed), streamed text equals unary text, the prompts times n are held to the request's
cap and to the gateway's places as n is, and echo puts each prompt's text before its choices' (not with logprobs)."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.openai_protocol import MAX_N
from tests.openai_util import MODEL, Core, Server, _wait_idle
from tests.openai_util import model, served  # noqa: F401 - fixtures

TEXTS = ["The quick brown fox", "Experts route each token", "A mixture of experts"]
SAMPLED = dict(model=MODEL, max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True})


def _texts(client, stream: bool, **kw) -> tuple[dict[int, str], dict, list[int]]:
    """({index: text}, usage, the indexes in the order their events came) of one completions request."""
    if not stream:
        out = client.completions.create(**kw)
        return {c.index: c.text for c in out.choices}, out.usage.model_dump(), [c.index for c in out.choices]
    texts: dict[int, str] = {}
    order, usage = [], None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            order.append(c.index)
        usage = chunk.usage.model_dump() if chunk.usage else usage
    return texts, usage, order


def _alone(client, prompts: list, n: int, **kw) -> tuple[list[str], int, int]:
    """(each prompt's n texts, prompt by prompt; the prompt tokens and completion tokens summed) sent one by one."""
    texts, prompt_tokens, done = [], 0, 0
    for p in prompts:
        out = client.completions.create(prompt=p, n=n, **kw)
        texts += [c.text for c in sorted(out.choices, key=lambda c: c.index)]
        prompt_tokens, done = prompt_tokens + out.usage.prompt_tokens, done + out.usage.completion_tokens
    return texts, prompt_tokens, done


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("form", ["texts", "ids"])
def test_several_prompts_are_answered_as_each_sent_alone(served, stream, form):
    """A list of strings or of token-id lists was a 400 unsupported_value. Now, as in OpenAI's API: n choices a
    prompt, choice j of prompt i at index i * n + j, each the text that prompt gets sent alone (seed + j), usage
    the prompts' tokens (once each, whatever n) and every choice's; streamed, the prompts' choices come
    interleaved, each event with its index, and join to the unary text."""
    core, client = served
    prompts = TEXTS if form == "texts" else [core.tokenizer.encode(t) for t in TEXTS]
    want, prompt_tokens, done = _alone(client, prompts, 2, **SAMPLED)
    assert len(set(want)) == len(want)  # every choice differs: a mix-up of indexes would show
    texts, usage, order = _texts(client, stream, prompt=prompts, n=2, **SAMPLED)
    assert [texts[i] for i in range(len(want))] == want and len(texts) == len(want) == 6
    assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == done == 36
    assert usage["total_tokens"] == prompt_tokens + done
    # streamed: an event per token of each choice, in the order the engine made them, not prompt by prompt
    assert sorted(set(order)) == list(range(6)) and (order != sorted(order)) is stream


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_each_prompt_before_its_choices(served, stream):
    """echo: true was a 400 unsupported_value. Now each choice's text is its prompt's text and then the completion
    (a string prompt as sent, token ids as tokenizer.decode writes them, as vLLM decodes them), streamed or not,
    with several prompts and n; usage counts the completion's tokens only, as without echo."""
    core, client = served
    want, prompt_tokens, done = _alone(client, TEXTS[:2], 2, **SAMPLED)
    texts, usage, _ = _texts(client, stream, prompt=TEXTS[:2], n=2, echo=True, **SAMPLED)
    assert [texts[i] for i in range(4)] == [h + w for h, w in zip([TEXTS[0]] * 2 + [TEXTS[1]] * 2, want)]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_tokens, done)
    ids = [core.tokenizer.encode(TEXTS[2]) + [3]] * 2  # ends in <|im_start|>: a special token, written by decode
    head, (alone, _, _) = core.tokenizer.decode(ids[0]), _alone(client, ids[:1], 1, **SAMPLED)
    assert head.endswith("<|im_start|>")
    one, _, _ = _texts(client, stream, prompt=ids, echo=True, **SAMPLED)
    assert one == {0: head + alone[0], 1: head + alone[0]}
    off, _, _ = _texts(client, stream, prompt=ids[0], echo=False, **SAMPLED)
    assert off == {0: alone[0]}


def test_echo_with_logprobs_is_a_400_naming_echo(served):
    """echo with logprobs answers the prompt tokens' logprobs in OpenAI's API, which this server does not compute:
    a 400 unsupported_value naming echo (never the completion's logprobs under the prompt's text); either alone
    is served."""
    core, client = served
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=2, echo=True, logprobs=0,
                                      stream=stream)
        assert (e.value.body["param"], e.value.body["code"]) == ("echo", "unsupported_value"), e.value.body
        assert "logprobs" in e.value.body["message"]
    out = client.completions.create(model=MODEL, prompt=TEXTS[0], max_tokens=2, logprobs=0)
    assert len(out.choices[0].logprobs.tokens) == 2
    _wait_idle(core)


@pytest.mark.parametrize("prompt,n,param,code,said", [
    (["a"] * (MAX_N + 1), None, "prompt", "invalid_value", "17 choices; the limit is 16"),  # one too many
    (["a"] * 5, 4, "prompt", "invalid_value", "5 prompts x n 4 are 20 choices"),
    ([[5, 6]] * 9, 2, "prompt", "invalid_value", "18 choices; the limit is 16"),
    (["one", "two"], 17, "n", "invalid_value", "must be in [1, 16]"),  # n alone over the cap: named as before
    (["one", ""], None, "prompt[1]", "invalid_value", "empty"),  # a bad prompt among several: named by its place
    ([[5, 6], [1, 10**9]], None, "prompt[1]", "invalid_value", "outside the vocabulary"),
    ([[5, 6], [5] * 200], None, "prompt[1]", "context_length_exceeded", "200 tokens"),
])
def test_too_many_choices_or_a_bad_prompt_among_several_is_a_400_naming_it(served, prompt, n, param, code, said):
    """The prompts times n count against the choices a request may hold, MAX_N (16), as n alone does; a bad prompt
    among several is named prompt[i]; nothing of the request runs, and the next request is served."""
    core, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, n=n, max_tokens=2)
    assert (e.value.body["param"], e.value.body["code"]) == (param, code), e.value.body
    assert e.value.body["message"].startswith(f"{param}: ") and said in e.value.body["message"], e.value.body
    _wait_idle(core)
    out = client.completions.create(model=MODEL, prompt=["a"] * 4, n=4, max_tokens=1)  # 16 choices: the limit
    assert sorted(c.index for c in out.choices) == list(range(MAX_N))


def test_the_prompts_times_n_take_the_gateway_s_places_as_n_does(model):  # noqa: F811
    """With room for 3 requests (2 running, 1 waiting), 2 prompts x n 2 are 4 choices: a 429 counted once, as n 4 is,
    none of them left running; 3 prompts x n 1 fit and are served."""
    core = Core(*model, max_num_seqs=2, max_queue=1, max_model_len=128)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    try:
        for kw in ({"prompt": TEXTS[:2], "n": 2}, {"prompt": TEXTS[0], "n": 4}):
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=MODEL, max_tokens=40, extra_body={"ignore_eos": True}, **kw)
            assert e.value.body["code"] == "rate_limit_exceeded"
            _wait_idle(core)
        assert core.runner.stats()["refused"] == 2 and core.metrics.requests[("http", "rejected")] == 2
        out = client.completions.create(model=MODEL, prompt=TEXTS, max_tokens=3, extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 9
    finally:
        server.stop()
        core.runner.close()
