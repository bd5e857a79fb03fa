"""The OpenAI HTTP API's refusals other than 400, body by body, the same on every route that can give them (a real
engine, in-process experts, uvicorn): 404 model_not_found; 429 rate_limit_exceeded (type requests) and 503
server_is_overloaded (type service_unavailable_error), as OpenAI answers them; and code null where OpenAI's own answer
has none: an unknown URL or method (OpenAI's "Invalid URL") and a body over the limit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from openai import OpenAI

from elasticmoe.engine.validation import RequestLimits
from elasticmoe.gateway.openai_api import build_openai_app
from tests.openai_util import CHAT, MODEL, PROMPT, Core, Server, _wait_idle
from tests.openai_util import model, served  # noqa: F401 - fixtures

BODIES = {"/v1/completions": {"prompt": PROMPT, "max_tokens": 2}, "/v1/chat/completions": {"messages": CHAT,
                                                                                           "max_tokens": 2}}
GENERATING = [(path, stream) for path in BODIES for stream in (False, True)]
REFUSAL = {"type": "invalid_request_error", "param": None, "code": None}


def _call(base: str, path: str, body: dict | bytes | None = None, method: str = "POST") -> tuple[int, dict, dict]:
    """(status, the body's "error" object, headers) of a refused call."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data, {"Content-Type": "application/json"}, method=method)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    out = json.loads(e.value.read())
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    return e.value.code, out["error"], dict(e.value.headers)


def _without_message(err: dict) -> dict:
    assert isinstance(err["message"], str) and err["message"]
    return {k: v for k, v in err.items() if k != "message"}


def _base(client: OpenAI) -> str:
    return str(client.base_url).removesuffix("/v1/")


def test_an_unknown_model_is_model_not_found_on_every_route(served):  # noqa: F811
    base = _base(served[1])
    calls = [(p, {**b, "model": "gpt-4o"}, "POST") for p, b in BODIES.items()]
    calls += [("/v1/completions", {**BODIES["/v1/completions"], "model": "gpt-4o", "stream": True}, "POST"),
              ("/tokenize", {"model": "gpt-4o", "prompt": "hi"}, "POST"),
              ("/detokenize", {"model": "gpt-4o", "tokens": [1, 2]}, "POST"), ("/v1/models/gpt-4o", None, "GET")]
    for path, body, method in calls:
        status, err, _ = _call(base, path, body, method)
        assert (status, _without_message(err)) == (404, {**REFUSAL, "param": "model", "code": "model_not_found"}), path


@pytest.mark.parametrize("method,path,status", [("POST", "/v1/embeddings", 404), ("GET", "/v1/completions", 405),
                                                ("DELETE", "/v1/models", 405), ("POST", "/tokenizer", 404)])
def test_an_unknown_url_or_method_has_no_code_as_in_openai(served, method, path, status):  # noqa: F811
    got, err, _ = _call(_base(served[1]), path, b"{}" if method == "POST" else None, method)
    assert (got, _without_message(err)) == (status, REFUSAL)


def test_metrics_in_a_server_without_them_is_an_unknown_url(served):  # noqa: F811
    """GET /metrics where the core keeps none: the 404 of an unknown URL (its type was "not_found", no OpenAI type)."""
    core, client = served
    metrics, core.metrics = core.metrics, None
    try:
        status, err, _ = _call(_base(client), "/metrics", None, "GET")
    finally:
        core.metrics = metrics
    assert (status, _without_message(err)) == (404, REFUSAL) and "/metrics" in err["message"]


def test_a_body_over_the_limit_is_a_413_with_no_code_on_every_route(served):  # noqa: F811
    core, client = served
    engine = core.runner.engine
    validator = engine.validator
    engine.set_limits(RequestLimits(max_body_bytes=1024))
    try:
        for path in (*BODIES, "/tokenize", "/detokenize"):
            status, err, _ = _call(_base(client), path, {"prompt": "x" * 2000, "messages": CHAT, "tokens": [1]})
            assert (status, _without_message(err)) == (413, REFUSAL), path
            assert "1024 bytes" in err["message"]
    finally:
        engine.validator = validator


def _expect_each(base: str, status: int, type_: str, code: str) -> None:
    for path, stream in GENERATING:
        got, err, headers = _call(base, path, {**BODIES[path], "model": MODEL, "stream": stream})
        assert (got, _without_message(err)) == (status, {**REFUSAL, "type": type_, "code": code}), (path, stream)
        assert headers["retry-after"] == "1"


def test_a_full_queue_is_a_429_rate_limit_exceeded_on_every_route(model):  # noqa: F811
    core = Core(*model, max_num_seqs=1, max_queue=0, max_model_len=512)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    core.dispatcher.delay_s = 0.005  # the busy request lasts >= 4 s
    try:
        busy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # running: the only slot is taken and no one may wait
        _expect_each(_base(client), 429, "requests", "rate_limit_exceeded")
        busy.close()
    finally:
        server.stop()
        core.runner.close()


def test_not_ready_and_experts_gone_are_503_server_is_overloaded_on_every_route(served):  # noqa: F811
    core, client = served
    core.ready = False
    try:
        _expect_each(_base(client), 503, "service_unavailable_error", "server_is_overloaded")
    finally:
        core.ready = True
    _wait_idle(core)
    engine = core.runner.engine
    backoff, engine.retry_backoff_s = engine.retry_backoff_s, (0.01, 0.01)
    core.dispatcher.unavailable = True
    try:
        _expect_each(_base(client), 503, "service_unavailable_error", "server_is_overloaded")
    finally:
        core.dispatcher.unavailable = False
        engine.retry_backoff_s = backoff
