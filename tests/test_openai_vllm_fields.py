"""vLLM's skip_special_tokens and chat_template_kwargs on the OpenAI API, with the official client over uvicorn and a
real engine: the text equals tokenizer.decode of the same tokens with the same skip_special_tokens (streamed as
unary, and as the offline LLM writes it), and the prompt equals transformers' apply_chat_template with the same
extra variables; bad values are 400s naming the field."""

from __future__ import annotations

import openai
import pytest

from elasticmoe import SamplingParams
from tests.openai_util import MODEL, post_json
from tests.openai_util import llm, model, served  # noqa: F401 - fixtures

BIASED = {"1": 6, "3": 6}  # <s> and <|im_start|>, which end nothing: sampled now and then among the text
SAMPLED = dict(model=MODEL, max_tokens=12, temperature=1.0, seed=5)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Qwen3's switch, as its template writes it: an empty thinking block when enable_thinking is false
THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking "
         "is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _ids(choice, chat: bool) -> list[int]:
    """A choice's token ids, asked with logprobs and return_tokens_as_token_ids."""
    tokens = [e.token for e in choice.logprobs.content] if chat else choice.logprobs.tokens
    return [int(t.split(":", 1)[1]) for t in tokens]


def _streamed(client, chat: bool, **kw) -> str:
    create = client.chat.completions.create if chat else client.completions.create
    parts = [(c.choices[0].delta.content or "") if chat else c.choices[0].text
             for c in create(stream=True, **kw) if c.choices]
    return "".join(parts)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_skip_special_tokens_decides_whether_special_tokens_add_text(served, chat):
    """skip_special_tokens was refused as an unknown field. Left out or true, a special token adds no text, as
    before; false, its text is kept: the answer is tokenizer.decode of its tokens with that skip_special_tokens,
    streamed or not."""
    core, client = served
    tok = core.tokenizer
    kw = {"messages": CHAT} if chat else {"prompt": "The fox"}
    texts = {}
    for skip in (None, True, False):
        extra = {"logit_bias": BIASED, "return_tokens_as_token_ids": True}
        if skip is not None:
            extra["skip_special_tokens"] = skip
        args = {**SAMPLED, **kw, "extra_body": extra}
        if chat:
            out = client.chat.completions.create(logprobs=True, **args)
            text = out.choices[0].message.content
        else:
            out = client.completions.create(logprobs=0, **args)
            text = out.choices[0].text
        ids = _ids(out.choices[0], chat)
        assert {1, 3} & set(ids) and set(ids) - {1, 3}  # special tokens among the text
        assert text == tok.decode(ids, skip_special_tokens=skip is not False), (skip, ids)
        assert _streamed(client, chat, **{**args, "extra_body": {k: v for k, v in extra.items()
                                                                 if k != "return_tokens_as_token_ids"}}) == text
        texts[skip] = text
    assert texts[None] == texts[True] != texts[False] and "<|im_start|>" in texts[False]


def test_the_offline_llm_takes_skip_special_tokens(served, llm):
    """As vLLM's SamplingParams takes it: the offline text is the HTTP API's for the same request."""
    _, client = served
    for skip in (True, False):
        ref = llm.generate(["The fox"], SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                      logit_bias={1: 6, 3: 6}, skip_special_tokens=skip))[0]
        out = client.completions.create(prompt="The fox", extra_body={"logit_bias": BIASED,
                                                                      "skip_special_tokens": skip}, **SAMPLED)
        assert ref.text == out.choices[0].text and ("<|im_start|>" in ref.text) is not skip


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_skip_special_tokens_not_a_boolean_is_a_400_naming_it(served, chat):
    _, client = served
    create = client.chat.completions.create if chat else client.completions.create
    kw = {"messages": CHAT} if chat else {"prompt": "The fox"}
    with pytest.raises(openai.BadRequestError) as e:
        create(model=MODEL, max_tokens=2, extra_body={"skip_special_tokens": "no"}, **kw)
    assert (e.value.body["param"], e.value.body["code"]) == ("skip_special_tokens", "invalid_type"), e.value.body


def _post(client, path: str, body: dict) -> tuple[int, dict]:
    return post_json(str(client.base_url).rstrip("/").removesuffix("/v1") + path, body)


@pytest.fixture
def thinking(served):
    """The served tokenizer with Qwen3's enable_thinking switch in its chat template."""
    core, client = served
    core.tokenizer.chat_template, before = THINK, core.tokenizer.chat_template
    yield core, client
    core.tokenizer.chat_template = before


def test_chat_template_kwargs_reach_the_template_as_in_transformers(thinking):
    """chat_template_kwargs ({"enable_thinking": false} for Qwen3) was a 400 unknown_parameter. Its variables now
    reach the chat template as apply_chat_template's **kwargs: the prompt is transformers' for the same kwargs (on
    chat completions and /tokenize), and the answer is the one those ids get as a completion, streamed or not."""
    core, client = thinking
    off = core.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, enable_thinking=False)
    off = list(off if isinstance(off, list) else off["input_ids"])
    plain = core.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert off != list(plain if isinstance(plain, list) else plain["input_ids"])  # the variable changes the prompt
    kwargs = {"enable_thinking": False}
    status, got = _post(client, "/tokenize", {"messages": CHAT, "chat_template_kwargs": kwargs})
    assert status == 200 and got["tokens"] == off, got
    greedy = dict(model=MODEL, max_tokens=6, temperature=0)
    want = client.completions.create(prompt=off, extra_body={"ignore_eos": True}, **greedy).choices[0].text
    args = dict(messages=CHAT, extra_body={"ignore_eos": True, "chat_template_kwargs": kwargs}, **greedy)
    out = client.chat.completions.create(**args)
    assert out.usage.prompt_tokens == len(off) and out.choices[0].message.content == want
    assert _streamed(client, True, **args) == want


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("kwargs,param,code", [
    ({"tokenize": False}, "chat_template_kwargs.tokenize", "invalid_value"),  # apply_chat_template's own
    ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt", "invalid_value"),
    ({"messages": []}, "chat_template_kwargs.messages", "invalid_value"),  # the renderer's own variable
    (["enable_thinking"], "chat_template_kwargs", "invalid_type"),
])
def test_a_chat_template_kwarg_the_server_sets_is_a_400_naming_it(thinking, path, kwargs, param, code):
    """A name of apply_chat_template's own arguments (or the renderer's messages) would override what the request's
    fields set, or fail in transformers as a 'multiple values' TypeError: a 400 naming chat_template_kwargs.<name>;
    the server serves on."""
    core, client = thinking
    body = {"model": MODEL, "messages": CHAT, **({"max_tokens": 2} if path != "/tokenize" else {})}
    status, got = _post(client, path, {**body, "chat_template_kwargs": kwargs})
    assert status == 400 and (got["error"]["param"], got["error"]["code"]) == (param, code), got
    status, got = _post(client, path, {**body, "chat_template_kwargs": {"enable_thinking": True}})
    assert status == 200, got


def test_tokenize_takes_chat_template_kwargs_only_with_messages(served):
    _, client = served
    status, got = _post(client, "/tokenize", {"prompt": "hi", "chat_template_kwargs": {"enable_thinking": False}})
    assert status == 400 and got["error"]["param"] == "chat_template_kwargs", got
