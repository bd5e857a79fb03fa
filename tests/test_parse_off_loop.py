"""A large request body is parsed and validated off the event loop (gateway/tokenizing.py's worker): while one is
being validated (held here inside the real ChatRequest model until released), the same server answers a small
request; on the loop, 3.5 MB of small objects held every other request for about a second. HTTP over uvicorn and a
real engine with in-process experts."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest
from openai import OpenAI
from pydantic import model_validator

from elasticmoe.gateway import openai_api
from elasticmoe.gateway.openai_protocol import ChatRequest
from elasticmoe.gateway.tokenizing import OFF_LOOP_BYTES
from tests.openai_util import CHAT, MODEL, Core, Server
from tests.openai_util import model  # noqa: F401 - the fixture

BIG = [{"role": "user", "content": "w"}] * 100_000  # 3.3 MB of small objects: a prompt over the limit (a 400)
entered, release, threads = threading.Event(), threading.Event(), []


class HeldChatRequest(ChatRequest):
    """The real request model; validating a body of more than 1000 messages first waits for `release`."""

    @model_validator(mode="before")
    @classmethod
    def _hold(cls, data):
        if isinstance(data, dict) and len(data.get("messages", ())) > 1000:
            threads.append(threading.current_thread().name)
            entered.set()
            assert release.wait(60)
        return data


@pytest.fixture
def served(model, monkeypatch):  # noqa: F811
    monkeypatch.setattr(openai_api, "ChatRequest", HeldChatRequest)
    entered.clear(), release.clear(), threads.clear()
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    server = Server(openai_api.build_openai_app(core))
    yield core, server
    release.set()
    server.stop()
    core.runner.close()


def _post_big(url: str) -> tuple[int, dict]:
    body = json.dumps({"model": MODEL, "messages": BIG, "max_tokens": 1}).encode()
    assert len(body) >= 3_000_000 and len(body) >= OFF_LOOP_BYTES
    req = urllib.request.Request(f"{url}/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_small_request_is_answered_while_a_large_body_is_validated(served):
    _, server = served
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=20)
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(_post_big(server.url)))
    t.start()
    try:
        assert entered.wait(60), "the large body was never validated"
        out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)  # while it is held
        assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1
    finally:
        release.set()
        t.join(120)
    assert threads and all(name.startswith("tokenize") for name in threads), threads
    status, body = outcome[0]
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "messages", "invalid_value"), body
    assert "limits.max_prompt_bytes" in body["error"]["message"]  # the rendered conversation is over the limit
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices  # still serving
