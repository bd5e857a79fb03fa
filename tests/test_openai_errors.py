"""The OpenAI HTTP API's refusals and aborts over a real engine (in-process experts) and uvicorn, called with the
official client: 400s naming the field, 429 on a full queue, 503 when not ready or the experts are gone, and a
client gone mid-way aborting its request."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from tests.openai_util import CHAT, MODEL, PROMPT, Core, Server, _greedy, _wait_idle
from tests.openai_util import llm, model, served  # noqa: F401 - fixtures


V, T, U, CTX = "invalid_value", "invalid_type", "unsupported_value", "context_length_exceeded"


@pytest.mark.parametrize("kw,param,code", [
    ({"temperature": -1}, "temperature", V), ({"top_p": 2}, "top_p", V), ({"max_tokens": 0}, "max_tokens", V),
    ({"n": 0}, "n", V), ({"n": 17}, "n", V), ({"frequency_penalty": 2.5}, "frequency_penalty", V),
    ({"presence_penalty": -3}, "presence_penalty", V), ({"logit_bias": {"5": 300}}, "logit_bias[5]", V),
    ({"logit_bias": {"x": 3}}, "logit_bias", V), ({"logit_bias": {"100000": 3}}, "logit_bias", V),
    ({"logit_bias": {"\u00b2": 3}}, "logit_bias", V), ({"logit_bias": {"5": "x"}}, "logit_bias.5", T),
    ({"prompt": ["one", ""]}, "prompt[1]", V), ({"prompt": [1, 10**9]}, "prompt", V),
    ({"prompt": ["one"] * 9, "n": 2}, "prompt", V), ({"echo": True, "logprobs": 0}, "echo", U),
    ({"prompt": [1] * 200}, "prompt", CTX), ({"max_tokens": 500}, "max_tokens", CTX),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty", V), ({"max_tokens": "many"}, "max_tokens", T),
    ({"extra_body": {"min_p": 1.5}}, "min_p", V), ({"extra_body": {"min_tokens": 5}}, "min_tokens", V),
    ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids[0]", V),
    ({"stream": True, "stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo", "unknown_parameter"),
    ({"extra_body": {"best_of": 2}}, "best_of", U), ({"stream_options": {"include_usage": True}}, "stream_options", V),
    ({"extra_body": {"stop_token_ids": [1, "x"]}}, "stop_token_ids[1]", T),
    ({"stop": ["ok", ""]}, "stop[1]", V), ({"stop": ["ok", "x" * 257]}, "stop[1]", V), ({"stop": ""}, "stop", V),
    ({"stop": "x" * 257}, "stop", V),
])
def test_bad_completion_fields_are_openai_400s(served, kw, param, code):
    """Every 400 names the field (its path, as OpenAI writes it) and carries OpenAI's code for the fault. One of
    several stop strings empty or too long was named `stop`, not which one: now `stop[i]` (a lone one: `stop`)."""
    _, client = served
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert param in e.value.body["message"] and e.value.body["code"] == code, e.value.body


@pytest.mark.parametrize("kw,param,code", [
    ({"messages": []}, "messages", "empty_array"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                    "messages[0].role", V),
    ({"messages": [CHAT[0], {"content": "x"}]}, "messages[1].role", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages", CTX),
    ({"top_logprobs": 2}, "top_logprobs", V), ({"max_completion_tokens": 0}, "max_completion_tokens", V),
    ({"max_completion_tokens": 500}, "max_completion_tokens", CTX),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", U),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text",
     "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content[0].text", T),
    ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name", T),
    # content is required (an empty turn was sent), but on an assistant message with tool_calls or a refusal
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [CHAT[0], {"role": "user", "content": None}]}, "messages[1].content", T),
    ({"messages": [*CHAT, {"role": "assistant", "content": None}, CHAT[1]]}, "messages[2].content", T),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "empty_array"),
])
def test_bad_chat_fields_are_openai_400s(served, kw, param, code):
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": MODEL, "messages": CHAT, "max_tokens": 4, **kw})
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"].startswith(param) and e.value.body["code"] == code, e.value.body


@pytest.mark.parametrize("part,param,code,words", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "messages[0].content[1].type", U,
     "'image_url' parts are not supported"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages[0].content[1].type", U,
     "'input_audio' parts are not supported"),
    ({"type": "file", "file": {"file_id": "file-1"}}, "messages[0].content[1].type", U, "'file' parts are not"),
    ({"text": "Hi."}, "messages[0].content[1].type", "missing_required_parameter", "a content part needs a type"),
    ({"type": "text"}, "messages[0].content[1].text", "missing_required_parameter", "a 'text' part needs its text"),
    ({"type": "text", "text": 5}, "messages[0].content[1].text", T, "must be a string, got int"),
    ({"type": "text", "text": "Hi.", "bogus": 1}, "messages[0].content[1].bogus", "unknown_parameter",
     "not a field of a 'text' content part (it takes type and text only)"),
    ({"type": "text", "text": "Hi.", "cache_control": {"type": "ephemeral"}}, "messages[0].content[1].cache_control",
     "unknown_parameter", "not a field of a 'text' content part"),
], ids=["image", "audio", "file", "no-type", "text-without-text", "text-not-string", "unknown-field",
        "cache-control"])
def test_a_content_part_not_taken_is_named_by_its_place_and_type(served, part, param, code, words):
    """The 400 names the part's field, as OpenAI names it (param messages[0].content[1].type for an image sent to a
    text-only model): it named only messages[0].content, and a text part without text was unsupported_value. A
    part's unknown field (OpenAI's part schemas are closed) was dropped in silence: a 400 unknown_parameter."""
    _, client = served
    content = [{"type": "text", "text": "What is this?"}, part]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert (e.value.body["param"], e.value.body["code"]) == (param, code), e.value.body
    assert e.value.body["message"].startswith(f"{param}: ") and words in e.value.body["message"], e.value.body


@pytest.mark.parametrize("body,param,code", [
    (b"{not json", None, "invalid_json"), (b"[1, 2]", None, "invalid_type"),
    (b'{"max_tokens": 2}', "messages", "missing_required_parameter"),
    (b'{"messages": [], "bogus": 1}', "bogus", "unknown_parameter"),
])
def test_bodies_that_are_no_request_carry_a_code(served, body, param, code):
    _, client = served
    req = urllib.request.Request(f"{client.base_url}chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")


@pytest.mark.parametrize("chat,kw,param,message", [
    (False, {"stop": 5}, "stop", "stop: must be a string or a list of strings"),
    (False, {"stop": [1]}, "stop", "stop: must be a string or a list of strings"),
    (False, {"prompt": 5}, "prompt",
     "prompt: must be a string, a list of integers, a list of strings or a list of lists of integers"),
    (True, {"tool_choice": 5}, "tool_choice", "tool_choice: must be a string or an object"),
    (True, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     "messages[0].content: must be a string or a list of objects"),
    (True, {"messages": ["Hi."]}, "messages[0]", "messages[0]: must be an object"),
    (True, {"tools": ["get_time"]}, "tools[0]", "tools[0]: must be an object"),
    (True, {"stream": True, "stream_options": True}, "stream_options", "stream_options: must be an object"),
], ids=["stop", "stop-list", "prompt", "tool_choice", "content", "message", "tool", "stream_options"])
def test_a_wrong_type_in_a_union_field_names_the_field_and_what_it_takes(served, chat, kw, param, message):
    """Not pydantic's inner branch ("stop.str: Input should be a valid string") nor our class ("a valid dictionary or
    instance of ChatMessage"): the field as sent, and its types."""
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(**{"model": MODEL, "messages": CHAT, "max_tokens": 4, **kw})
        else:
            client.completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kw})
    assert (e.value.body["param"], e.value.body["message"], e.value.body["code"]) == (param, message, "invalid_type")


@pytest.mark.parametrize("method,path,status", [("POST", "embeddings", 404), ("GET", "completions", 405)])
def test_an_unknown_route_or_method_answers_in_the_openai_error_shape(served, method, path, status):
    _, client = served
    req = urllib.request.Request(f"{client.base_url}{path}", data=b"{}" if method == "POST" else None, method=method,
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == status and set(err) == {"message", "type", "param", "code"}
    assert f"/v1/{path}" in err["message"] and err["type"] == "invalid_request_error"
    if status == 405:
        assert "POST" in e.value.headers["allow"]


def test_not_ready_is_a_503(served):
    core, client = served
    core.ready = False
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    finally:
        core.ready = True
    assert e.value.status_code == 503 and e.value.body["code"] == "server_is_overloaded"


@pytest.fixture
def slow(served):
    """The served engine at >= 10 ms per step (2 MoE layers x 5 ms) for the duration of a test."""
    core, client = served
    _wait_idle(core)
    core.dispatcher.delay_s = 0.005
    yield core, client
    core.dispatcher.delay_s = 0.0


def test_disconnect_mid_stream_aborts_the_request(slow):
    core, client = slow
    steps = core.runner.stats()["steps"]
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=90, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    _wait_idle(core)
    assert core.runner.stats()["steps"] - steps < 80


def test_disconnect_before_a_non_streamed_response_aborts_the_request(slow):
    core, client = slow  # 120 tokens take >= 1.2 s: the client gives up after 0.3 s
    steps, gone = core.runner.stats()["steps"], core.metrics.errors.get("499", 0)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).completions.create(model=MODEL, prompt="Hi", max_tokens=120, temperature=0,
                                                            extra_body={"ignore_eos": True})
    _wait_idle(core)
    assert core.runner.stats()["steps"] - steps < 110
    deadline = time.monotonic() + 5
    while core.metrics.errors.get("499", 0) == gone:
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.02)


def test_full_queue_is_a_429(model):
    core = Core(*model, max_num_seqs=1, max_queue=0, max_model_len=256)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    core.dispatcher.delay_s = 0.005  # the busy request lasts >= 2 s
    try:
        busy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # running: the only slot is taken and no one may wait
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
        assert e.value.response.headers["retry-after"] == "1"
        busy.close()
        _wait_idle(core)
        core.dispatcher.delay_s = 0.0
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        assert core.metrics.requests[("http", "rejected")] == 1 and core.metrics.errors["429"] == 1
    finally:
        server.stop()
        core.runner.close()


@pytest.mark.parametrize("kw,param", [
    ({"prompt": "\ud800"}, "prompt"), ({"seed": 2**64}, "seed"), ({"temperature": 1e-300}, "temperature"),
])
def test_inputs_that_used_to_be_500s_are_400s_and_spare_the_requests_in_flight(served, llm, kw, param):
    """A lone surrogate, a seed over 64 bits and an underflowing temperature: 400 naming the field, while a
    greedy stream already running finishes with exactly its reference text."""
    _, client = served
    ref = _greedy(llm, llm.encode(PROMPT), 16, ignore_eos=True)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kw}).encode()  # "\\ud800" escaped
    req = urllib.request.Request(f"{client.base_url}completions", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    err = json.loads(e.value.read())["error"]
    assert e.value.code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.text


def test_a_request_whose_experts_are_gone_is_a_503_and_the_server_recovers(served):
    core, client = served
    _wait_idle(core)
    engine = core.runner.engine
    backoff, engine.retry_backoff_s = engine.retry_backoff_s, (0.01, 0.01)
    core.dispatcher.unavailable = True
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["code"] == "server_is_overloaded"
        assert e.value.response.headers["retry-after"] == "1" and "injected" not in e.value.body["message"]
    finally:
        core.dispatcher.unavailable = False
        engine.retry_backoff_s = backoff
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_disconnect_while_a_stream_waits_for_its_first_token_aborts_it(model):
    """A streamed request queued behind a busy one, its client gone before the first token: it never runs."""
    core = Core(*model, max_num_seqs=1, max_model_len=512)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    core.dispatcher.delay_s = 0.005  # >= 10 ms a step
    try:
        steps, gone = core.runner.stats()["steps"], core.metrics.errors.get("499", 0)
        busy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=300, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # the only slot is taken: the next request waits in the queue
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.3).completions.create(model=MODEL, prompt="Hi", max_tokens=400, stream=True,
                                                                extra_body={"ignore_eos": True})
        deadline = time.monotonic() + 5
        while core.metrics.errors.get("499", 0) == gone:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.02)
        busy.close()
        _wait_idle(core, timeout=10)
        assert core.runner.stats()["steps"] - steps < 250, "the abandoned stream ran"
        assert core.runner.stats()["admitted"] == 0
    finally:
        server.stop()
        core.runner.close()


def test_a_choice_refused_for_room_stops_the_other_choices(model):
    """n=2 with room for one: the 429 ends the whole request; its first choice does not run on unseen."""
    core = Core(*model, max_num_seqs=1, max_queue=0, max_model_len=512)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    core.dispatcher.delay_s = 0.005  # >= 10 ms a step: 400 tokens take >= 4 s
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, n=2, temperature=0,
                                      extra_body={"ignore_eos": True})
        _wait_idle(core, timeout=2.0)  # the choice left running would take >= 4 s
    finally:
        server.stop()
        core.runner.close()


async def _asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict]:
    """One POST straight through the ASGI interface (no HTTP server parses the headers first)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent, out = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    async def send(message):
        out.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in out if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body"))


@pytest.mark.parametrize("length", [b"abc", b"-5", b"\xb2"])  # \xb2: '²', str.isdigit() but not int()
def test_a_content_length_that_is_not_a_number_is_a_400_naming_the_header(served, length):
    import asyncio

    core, _ = served
    body = b'{"prompt": "hi", "max_tokens": 1}'
    headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    status, reply = asyncio.run(_asgi_post(build_openai_app(core), "/v1/completions", headers, body))
    assert status == 400, reply
    assert "content-length" in reply["error"]["message"].lower() and reply["error"]["type"] == "invalid_request_error"
