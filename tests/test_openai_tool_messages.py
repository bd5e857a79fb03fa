"""A conversation with tool calls reaches the chat template: an assistant message's `tool_calls` (their arguments as
objects, as transformers documents them and vLLM passes them; OpenAI sends JSON strings) and a tool message's
`tool_call_id` (both were dropped). The prompt equals transformers' own rendering of the conversation, over a real
engine and uvicorn with the official client, on /v1/chat/completions and /tokenize; a malformed field is a 400
naming its path, with OpenAI's code."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.tokenizing import OFF_LOOP_CHARS
from tests.openai_util import CHAT, MODEL, Core, Server
from tests.openai_util import model  # noqa: F401 - the fixture
from tests.test_tokenize_off_loop import _while_held

# A tool-use template in the common shape (calls as JSON in <tool_call> blocks, results in <tool_response>): it
# walks the arguments as an object (.items(): a JSON string fails here) and writes each call's and result's id.
TEMPLATE = (
    "<s>{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ {'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson }} [{{ c['id'] }}: "
    "{% for k, v in c['function']['arguments'].items() %}{{ k }}={{ v }};{% endfor %}]</tool_call>{% endfor %}"
    "{% if m['role'] == 'tool' %}<tool_response id={{ m['tool_call_id'] }}>{% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}<|im_start|>tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": '{"city": "Lyon", "days": 2}'}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "15 C"}]},
]


def _transformers_form(messages: list[dict]) -> list[dict]:
    """The conversation as transformers documents it for apply_chat_template: arguments as objects; text parts as
    the text."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            if isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.loads(c["function"]["arguments"] or "{}")
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
    return out


@pytest.fixture(scope="module")
def served(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=1024)
    core.tokenizer.chat_template = TEMPLATE
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0)
    server.stop()
    core.runner.close()


def _tokenize(client: OpenAI, body: dict) -> tuple[int, dict]:
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _rendered(core, messages: list[dict], tools: list[dict] | None = None) -> tuple[str, list[int]]:
    """transformers' rendering of the conversation (the reference) and its token ids."""
    text = core.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return text, core.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_and_their_results_reach_the_chat_template(served, stream):
    core, client = served
    text, ids = _rendered(core, _transformers_form(CONVERSATION), TOOLS)
    assert '"arguments": {"city": "Paris"}} [call_1: city=Paris;]' in text and "days=2;" in text
    assert "<tool_response id=call_1>" in text and "<tool_response id=call_2>" in text
    status, out = _tokenize(client, {"messages": CONVERSATION})
    assert (status, out["tokens"]) == (200, _rendered(core, _transformers_form(CONVERSATION))[1])
    status, out = _tokenize(client, {"messages": CONVERSATION, "tools": TOOLS})  # as chat completions count them
    assert (status, out["tokens"], out["count"]) == (200, ids, len(ids))
    ref = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    kw = dict(model=MODEL, messages=CONVERSATION, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
        assert chunks[-1].usage.prompt_tokens == len(ids)
        return
    out = client.chat.completions.create(**kw)
    assert (out.choices[0].message.content, out.usage.prompt_tokens) == (ref, len(ids))


def test_tools_at_tokenize_need_messages(served):
    """/tokenize of a prompt renders no template: tools there are a 400 naming tools, not ignored."""
    _, client = served
    status, out = _tokenize(client, {"prompt": "Weather?", "tools": TOOLS})
    assert (status, out["error"]["param"], out["error"]["code"]) == (400, "tools", "invalid_value"), out


def test_arguments_given_as_an_object_and_empty_arguments_are_taken(served):
    """transformers' form (an object) as vLLM takes it, and "" as {} (vLLM's reading)."""
    core, client = served
    calls = [{**CALLS[0], "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {**CALLS[1], "function": {"name": "get_weather", "arguments": ""}}]
    sent = [CONVERSATION[0], {"role": "assistant", "tool_calls": calls}, *CONVERSATION[2:]]
    text, ids = _rendered(core, _transformers_form(sent))
    assert "[call_1: city=Paris;]" in text and "[call_2: ]" in text
    assert _tokenize(client, {"messages": sent})[1]["tokens"] == ids


def _call(**function) -> list[dict]:
    """CONVERSATION with the assistant's first call's function fields replaced."""
    convo = copy.deepcopy(CONVERSATION)
    convo[1]["tool_calls"][0]["function"].update(function)
    return convo


def _with(i: int, **fields) -> list[dict]:
    """CONVERSATION with message i's fields replaced (None: removed)."""
    convo = copy.deepcopy(CONVERSATION)
    convo[i].update(fields)
    convo[i] = {k: v for k, v in convo[i].items() if v is not None or k == "content"}
    return convo


@pytest.mark.parametrize("messages,param,code", [
    (_with(0, tool_calls=CALLS), "messages[0].tool_calls", "unknown_parameter"),
    (_with(1, tool_call_id="call_1"), "messages[1].tool_call_id", "unknown_parameter"),
    (_with(2, tool_call_id=None), "messages[2].tool_call_id", "missing_required_parameter"),
    (_with(2, tool_call_id=5), "messages[2].tool_call_id", "invalid_type"),
    (_with(1, tool_calls=[]), "messages[1].tool_calls", "empty_array"),
    (_with(1, tool_calls="call_1"), "messages[1].tool_calls", "invalid_type"),
    (_with(1, tool_calls=[{"type": "function", "function": CALLS[0]["function"]}]), "messages[1].tool_calls[0].id",
     "missing_required_parameter"),
    (_with(1, tool_calls=[{**CALLS[0], "type": "custom"}]), "messages[1].tool_calls[0].type", "invalid_value"),
    (_with(1, tool_calls=[{**CALLS[0], "extra": 1}]), "messages[1].tool_calls[0].extra", "unknown_parameter"),
    (_call(arguments="city=Paris"), "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    (_call(arguments="[1, 2]"), "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    (_call(arguments="[" * 100_000), "messages[1].tool_calls[0].function.arguments", "invalid_value"),
    (_call(arguments=5), "messages[1].tool_calls[0].function.arguments", "invalid_type"),
    (_call(name=None), "messages[1].tool_calls[0].function.name", "invalid_type"),
    (_call(name="get weather"), "messages[1].tool_calls[0].function.name", "invalid_value"),
    (_call(name=""), "messages[1].tool_calls[0].function.name", "invalid_value"),
    (_call(name="f" * 65), "messages[1].tool_calls[0].function.name", "invalid_value"),
    (_call(name="get_weather\n"), "messages[1].tool_calls[0].function.name", "invalid_value"),
    (_call(name="functions.get_weather"), "messages[1].tool_calls[0].function.name", "invalid_value"),
    (_with(1, tool_calls=[{**CALLS[0], "id": 5}]), "messages[1].tool_calls[0].id", "invalid_type"),
    (_with(3, tool_call_id="call_9"), "messages[3].tool_call_id", "invalid_value"),
    ([CONVERSATION[0], CONVERSATION[2]], "messages[1].tool_call_id", "invalid_value"),
    ([CONVERSATION[0], {"role": "assistant", "content": "Sunny."}, CONVERSATION[2]], "messages[2].tool_call_id",
     "invalid_value"),
    ([*CONVERSATION, {"role": "user", "content": "And?"}, CONVERSATION[2]], "messages[5].tool_call_id",
     "invalid_value"),
], ids=["calls-on-user", "id-on-assistant", "tool-without-id", "id-not-string", "no-calls", "calls-not-list",
        "call-without-id", "custom-call", "call-extra-field", "arguments-not-json", "arguments-not-object",
        "arguments-deep", "arguments-number", "name-null", "name-space", "name-empty",
        "name-65", "name-newline", "name-dot", "call-id-number", "answers-no-call", "tool-after-user",
        "tool-after-plain-assistant", "tool-after-a-later-user"])
def test_malformed_tool_fields_are_400s_naming_them(served, messages, param, code):
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert err["message"].startswith(param) or param in err["message"], err
    assert _tokenize(client, {"messages": messages})[1]["error"]["param"] == param  # /tokenize says the same
    assert client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=2).usage  # still serving


USER = {"role": "user", "content": "And tomorrow?"}


@pytest.mark.parametrize("messages,j,unanswered,after", [
    (CONVERSATION[:2], 0, "'call_1', 'call_2'", "the conversation ends there"),
    (CONVERSATION[:3], 1, "'call_2'", "the conversation ends there"),
    ([*CONVERSATION[:3], USER], 1, "'call_2'", "messages[3] is of role 'user'"),
    ([*CONVERSATION[:2], {"role": "assistant", "content": "Sunny."}, *CONVERSATION[2:]], 0, "'call_1', 'call_2'",
     "messages[2] is of role 'assistant'"),
    ([*CONVERSATION[:2], CONVERSATION[3], USER], 0, "'call_1'", "messages[3] is of role 'user'"),
], ids=["none-answered-last", "one-answered-last", "one-answered-then-user", "assistant-between",
        "second-answered-then-user"])
def test_a_call_no_tool_message_answers_is_a_400_naming_it(served, messages, j, unanswered, after):
    """OpenAI refuses an assistant message with tool_calls not followed by tool messages answering each id ("An
    assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'"), the
    conversation's last message too: here the template rendered calls with no results (or results after another
    turn) and the model answered as if they had been. A 400 naming the first call left unanswered and every such id;
    /tokenize says the same; the conversation with each call answered is served."""
    _, client = served
    param = f"messages[1].tool_calls[{j}].id"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, "invalid_value", "invalid_request_error"), err
    assert err["message"].startswith(f"{param}: an assistant message with tool_calls must be followed by tool "
                                     "messages answering each tool_call_id"), err
    assert f"not answered: {unanswered} (" in err["message"] and after in err["message"], err
    assert _tokenize(client, {"messages": messages})[1]["error"]["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=[*CONVERSATION, USER], max_tokens=2).usage


TWICE = [*CONVERSATION, {"role": "tool", "tool_call_id": "call_1", "content": "19 C"}]
SAME_IDS = [CONVERSATION[0], {"role": "assistant", "tool_calls": [CALLS[0], {**CALLS[1], "id": "call_1"}]},
            CONVERSATION[2], {**CONVERSATION[3], "tool_call_id": "call_1"}]


@pytest.mark.parametrize("messages,param,words", [
    (TWICE, "messages[4].tool_call_id", "duplicate value 'call_1': messages[2] already answers that call"),
    ([*CONVERSATION[:3], CONVERSATION[2], CONVERSATION[3]], "messages[3].tool_call_id",
     "duplicate value 'call_1': messages[2] already answers"),
    (SAME_IDS, "messages[1].tool_calls[1].id", "duplicate value 'call_1' (also tool_calls[0].id): each call of a "
                                               "message needs its own id"),
], ids=["answered-twice-last", "answered-twice-before-another", "one-id-for-two-calls"])
def test_a_call_answered_twice_or_an_id_given_twice_is_a_400_naming_it(served, messages, param, words):
    """OpenAI refuses two tool messages answering one tool_call_id ("Invalid parameter: Duplicate value for
    'tool_call_id' of '...', in messages[7] and messages[8]", param the second's tool_call_id) and repeated ids in
    one message's tool_calls (one tool message answers an id: the second call has no answer of its own). Both were
    rendered (two results of one call; two calls under one id, both "answered" by either result). A 400
    invalid_value naming the second; /tokenize says the same; the server keeps serving."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, "invalid_value", "invalid_request_error"), err
    assert err["message"].startswith(f"{param}: {words}"), err
    assert _tokenize(client, {"messages": messages})[1]["error"]["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=2).usage


def test_an_id_a_later_turn_uses_again_is_taken_and_answered_in_that_turn(served):
    """Ids are unique within one assistant message's tool_calls (above); across turns they may recur: providers whose
    ids restart each turn (Gemini's gem_0, short per-turn counters) send them so, a tool message answers a call of the
    assistant message right before it (so the pairing is never ambiguous), and no OpenAI refusal of it is known. The
    conversation is rendered as transformers renders it, each result after its own turn's call."""
    core, client = served
    again = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'}}
    messages = [*CONVERSATION, USER, {"role": "assistant", "content": None, "tool_calls": [again]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    text, ids = _rendered(core, _transformers_form(messages))
    assert text.count("[call_1: city=") == 2 and text.count("<tool_response id=call_1>") == 2
    assert text.index("city=Nice") < text.rindex("<tool_response id=call_1>")
    status, out = _tokenize(client, {"messages": messages})
    assert (status, out.get("tokens")) == (200, ids), out
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).usage.prompt_tokens == len(ids)


def test_a_long_tool_call_is_templated_off_the_loop(served):
    """Short contents, long arguments: their parsing and the template's rendering of them run on the tokenize
    thread; the event loop meanwhile answers a short request (on it, they held every other request)."""
    core, client = served
    convo = _call(arguments=json.dumps({"text": "word " * (OFF_LOOP_CHARS // 5 + 1)}))

    def send_long():
        try:
            client.chat.completions.create(model=MODEL, messages=convo, max_tokens=1)
        except openai.BadRequestError:  # over the context once tokenized
            return "refused"
        return "answered"

    def send_short():
        assert client.with_options(timeout=20).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)

    _while_held(core, send_long, send_short)
