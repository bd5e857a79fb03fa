"""What a chat request gives the chat template, over a real engine and uvicorn with the official client: a message's
`name` (transformers passes message dicts through; the name was dropped), and `tools` with tool_choice "none" (was
refused): served, the tools given to the template as vLLM gives them, the answer text and no tool call. Other
tool_choice values stay 400s naming tool_choice. The template here writes names and tools into the prompt."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.tokenizing import OFF_LOOP_CHARS
from tests.openai_util import MODEL, Core, Server
from tests.openai_util import model  # noqa: F401 - the fixture
from tests.test_tokenize_off_loop import _while_held

TEMPLATE = (
    "<s>{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.get('name') %} ({{ m['name'] }}){% endif %}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if tools %}<|im_start|>tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}<|im_end|>\n"
    "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMED = [{"role": "system", "content": "Be brief."}, {"role": "user", "name": "alice", "content": "Hi experts."},
         {"role": "assistant", "name": "bob", "content": "Hello."}, {"role": "user", "content": "Go on."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time"}}]


@pytest.fixture(scope="module")
def served(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=256)
    core.tokenizer.chat_template = TEMPLATE
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0)
    server.stop()
    core.runner.close()


def _ref(core, messages, tools=None) -> tuple[str, list[int]]:
    """transformers' rendering of the conversation (the reference) and its token ids."""
    text = core.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return text, core.tokenizer(text, add_special_tokens=False)["input_ids"]


def _greedy(client, **kw):
    return client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
                                          **kw)


def test_message_names_reach_the_chat_template(served):
    core, client = served
    text, ids = _ref(core, NAMED)
    assert "user (alice)" in text and "assistant (bob)" in text  # the template writes them
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps({"messages": NAMED}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["tokens"] == ids
    out = _greedy(client, messages=NAMED)
    assert out.usage.prompt_tokens == len(ids)
    ref = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == ref.choices[0].text


def test_a_tool_message_s_name_reaches_the_chat_template(served):
    """A tool message's `name` is not in OpenAI's API reference, but OpenAI takes it (its cookbook's function-calling
    example sends the function's name there, and clients copied it): it is taken, with the pattern of any message's
    name, and given to the template as the other messages' names are (templates that write a tool's name read it)."""
    core, client = served
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    sent = [NAMED[1], {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_time", "content": "12:00"}]
    text, ids = _ref(core, [NAMED[1], {"role": "assistant", "content": ""}, sent[2]])
    assert "tool (get_time)12:00" in text  # the template writes it
    assert _greedy(client, messages=sent).usage.prompt_tokens == len(ids)
    sent[2]["name"] = "get time"
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=sent)
    assert (e.value.body["param"], e.value.body["code"]) == ("messages[2].name", "invalid_value"), e.value.body


@pytest.mark.parametrize("stream", [False, True])
def test_tools_with_tool_choice_none_are_served_without_tool_calls(served, stream):
    core, client = served
    text, ids = _ref(core, NAMED, TOOLS)
    assert "tools: get_weather get_time" in text
    ref = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    kw = dict(messages=NAMED, tools=TOOLS, tool_choice="none", parallel_tool_calls=False)
    if stream:
        chunks = list(_greedy(client, stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.prompt_tokens == len(ids)
        return
    out = _greedy(client, **kw)
    msg = out.choices[0].message
    assert (msg.content, msg.tool_calls, out.choices[0].finish_reason) == (ref, None, "length")
    assert out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("tools,choice", [
    (TOOLS, "auto"), (TOOLS, "required"), (TOOLS, {"type": "function", "function": {"name": "get_time"}}),
    (TOOLS, None), (None, "required"),
], ids=["auto", "required", "named", "left-out", "required-no-tools"])
def test_tool_calls_asked_for_are_400s_naming_tool_choice(served, tools, choice):
    _, client = served
    kw = {k: v for k, v in (("tools", tools), ("tool_choice", choice)) if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=NAMED, **kw)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == ("tool_choice", "unsupported_value", "invalid_request_error")
    assert err["message"].startswith("tool_choice: this server makes no tool calls: only 'none' is supported")
    assert ("'auto'" in err["message"]) if choice is None else (repr(choice)[:20] in err["message"])
    assert _greedy(client, messages=NAMED, tool_choice="auto").choices[0].message.content  # no tools: auto is none


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_an_empty_tools_array_is_a_400_naming_tools(served, choice):
    """OpenAI answers `tools: []` with 400 empty_array naming tools (it was served as no tools), whatever
    tool_choice; /tokenize the same."""
    _, client = served
    kw = {"tool_choice": choice} if choice is not None else {}
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=NAMED, tools=[], **kw)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == ("tools", "empty_array", "invalid_request_error"), err
    assert err["message"].startswith("tools: "), err
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps({"messages": NAMED, "tools": []}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert (e.value.code, json.loads(e.value.read())["error"]["code"]) == (400, "empty_array")


def test_a_replayed_response_message_is_taken_and_its_refusal_is_its_text(served):
    """The official client's model_dump() of a response's message (refusal, annotations, audio, function_call and
    tool_calls null) and OpenAI's own answer (annotations []) are taken as the assistant turn they hold; a refusal
    with no content is that turn's text (it was dropped: an empty turn)."""
    core, client = served
    first = _greedy(client, messages=NAMED[:2])
    replayed = first.choices[0].message.model_dump()
    assert set(replayed) >= {"refusal", "annotations", "audio", "function_call", "tool_calls"}, replayed
    for sent in (replayed, {**replayed, "annotations": []}):
        out = _greedy(client, messages=[*NAMED[:2], sent, NAMED[3]])
        ref = _ref(core, [*NAMED[:2], {"role": "assistant", "content": replayed["content"]}, NAMED[3]])[1]
        assert out.usage.prompt_tokens == len(ref)
    refused = {"role": "assistant", "content": None, "refusal": "I cannot say."}
    text, ids = _ref(core, [*NAMED[:2], {"role": "assistant", "content": "I cannot say."}, NAMED[3]])
    assert "I cannot say." in text
    assert _greedy(client, messages=[*NAMED[:2], refused, NAMED[3]]).usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("message,param,code", [
    ({"role": "user", "contents": "Hi."}, "messages[1].contents", "unknown_parameter"),
    ({"role": "user", "content": "Hi.", "refusal": "no"}, "messages[1].refusal", "unknown_parameter"),
    ({"role": "assistant", "content": None, "audio": {"id": "audio_1"}}, "messages[1].audio", "unsupported_value"),
    ({"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": "{}"}},
     "messages[1].function_call", "unsupported_value"),
], ids=["misspelt-content", "refusal-on-user", "audio", "function-call"])
def test_a_message_field_not_taken_is_a_400_naming_it(served, message, param, code):
    """OpenAI refuses a message's unknown field ("Additional properties are not allowed"); it was dropped in
    silence, so a misspelt `contents` sent an empty turn, and an audio reply or legacy function_call vanished."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=[NAMED[0], message, NAMED[3]])
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert param in err["message"], err


@pytest.mark.parametrize("tool,param,code", [
    ({}, "tools[0].type", "missing_required_parameter"),
    ({"type": "function"}, "tools[0].function", "missing_required_parameter"),
    ({"type": "function", "function": {"name": 5}}, "tools[0].function.name", "invalid_type"),
    ({"type": "function", "function": {"name": "get_time", "params": {}}}, "tools[0].function.params",
     "unknown_parameter"),
    ({"type": "function", "function": {"name": "get time"}}, "tools[0].function.name", "invalid_value"),
    ({"type": "function", "function": {"name": ""}}, "tools[0].function.name", "invalid_value"),
    ({"type": "function", "function": {"name": "f" * 65}}, "tools[0].function.name", "invalid_value"),
    ({"type": "function", "function": {"name": "get_time\n"}}, "tools[0].function.name", "invalid_value"),
], ids=["empty", "no-function", "name-not-string", "misspelt-parameters", "name-with-space", "name-empty",
        "name-too-long", "name-trailing-newline"])
def test_a_malformed_tool_is_a_400_naming_its_field(served, tool, param, code):
    """OpenAI (and vLLM) check a tool's shape; here it reached the template, which failed on it as `messages` or
    wrote it as it was (a number for a name, a misspelt `params` dropped). A name OpenAI's pattern
    ^[a-zA-Z0-9_-]{1,64}$ refuses is a 400 invalid_value naming it (it was served)."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=NAMED, tools=[tool], tool_choice="none")
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps({"messages": NAMED, "tools": [tool]}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert json.loads(e.value.read())["error"]["param"] == param


@pytest.mark.parametrize("i,name", [
    (1, "alice smith"), (2, "b.o.b"), (1, ""), (0, "n" * 65), (1, "alice\n"), (2, "bôb"), (3, "x/y"),
], ids=["space", "dots", "empty", "65-chars", "trailing-newline", "accent", "slash"])
def test_a_message_name_outside_openais_pattern_is_a_400_naming_it(served, i, name):
    """OpenAI refuses a message's name outside ^[a-zA-Z0-9_-]{1,64}$ (400 invalid_value, param messages[i].name:
    "string does not match pattern"); it was served, written into the prompt as sent. /tokenize says the same, and
    names on the edge of the pattern are served."""
    _, client = served
    sent = [dict(m) for m in NAMED]
    sent[i]["name"] = name
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=sent)
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (f"messages[{i}].name", "invalid_value",
                                                        "invalid_request_error"), err
    assert err["message"].startswith(f"messages[{i}].name: "), err
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps({"messages": sent}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert json.loads(e.value.read())["error"]["param"] == f"messages[{i}].name"
    sent[i]["name"] = "A-z_0" + "9" * 59  # 64 characters of the pattern's classes
    assert _greedy(client, messages=sent).usage.prompt_tokens


def test_an_assistant_message_s_refusal_part_is_its_text(served):
    """OpenAI takes an assistant message's content as text and refusal parts ({"type": "refusal", "refusal": ...},
    the official client's ChatCompletionContentPartRefusalParam); a refusal part was a 400. Its refusal is that
    part's text, as vLLM takes it, joined to the other parts by newlines as text parts are."""
    core, client = served
    parts = [{"type": "text", "text": "Well."}, {"type": "refusal", "refusal": "I cannot say."}]
    sent = [*NAMED[:2], {"role": "assistant", "content": parts}, NAMED[3]]
    text, ids = _ref(core, [*NAMED[:2], {"role": "assistant", "content": "Well.\nI cannot say."}, NAMED[3]])
    assert "Well.\nI cannot say." in text
    assert _greedy(client, messages=sent).usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("message,param,code", [
    ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[1].content[0].type",
     "invalid_value"),
    ({"role": "assistant", "content": [{"type": "refusal"}]}, "messages[1].content[0].refusal",
     "missing_required_parameter"),
    ({"role": "assistant", "content": [{"type": "refusal", "refusal": 5}]}, "messages[1].content[0].refusal",
     "invalid_type"),
    ({"role": "assistant", "content": [{"type": "refusal", "refusal": "no", "text": "x"}]},
     "messages[1].content[0].text", "unknown_parameter"),
], ids=["on-a-user-message", "without-refusal", "refusal-not-string", "unknown-field"])
def test_a_refusal_part_elsewhere_or_without_its_text_is_a_400_naming_it(served, message, param, code):
    """A refusal part is an assistant's only (OpenAI's user, system, developer and tool messages take none)."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=[NAMED[0], message, NAMED[3]])
    err = e.value.body
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    assert err["message"].startswith(f"{param}: "), err


def test_the_deprecated_function_role_is_a_400_saying_what_to_send(served):
    """OpenAI still takes a message of role 'function' (deprecated, a legacy function_call's result); it was a 400
    invalid_value listing the roles as if 'function' were a typo. It is a known role not served: unsupported_value,
    pointing to tool messages, as the legacy function_call field is."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        _greedy(client, messages=[*NAMED[:2], {"role": "function", "name": "get_time", "content": "12:00"}])
    err = e.value.body
    assert (err["param"], err["code"]) == ("messages[2].role", "unsupported_value"), err
    assert err["message"].startswith("messages[2].role: ") and "'tool'" in err["message"], err


@pytest.mark.parametrize("assistant", [
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "no " * (OFF_LOOP_CHARS // 3 + 1)}]},
    {"role": "assistant", "content": None, "refusal": "no " * (OFF_LOOP_CHARS // 3 + 1)},
], ids=["refusal-part", "refusal-field"])
def test_a_long_refusal_is_templated_off_the_loop(served, assistant):
    """A refusal is an assistant turn's text, but it was not counted among a request's characters: a long one was
    templated and tokenized on the event loop, which meanwhile answered no other request."""
    core, client = served

    def send_long():
        try:
            _greedy(client, messages=[*NAMED[:2], assistant, NAMED[3]])
        except openai.BadRequestError:  # over the context once tokenized
            return "refused"
        return "answered"

    _while_held(core, send_long, lambda: client.with_options(timeout=20).chat.completions.create(
        model=MODEL, messages=NAMED, max_tokens=2))
