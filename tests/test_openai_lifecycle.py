"""The OpenAI HTTP API's request lifecycle over a real engine: a client gone mid-way, and the exported metrics.

The app is called as an ASGI server calls it (uvicorn's messages), so that a disconnect can land exactly between
two of the app's steps; the engine, runner, routes and Starlette's StreamingResponse are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from tests.cancel_util import quiet
from tests.openai_util import CHAT, MODEL, PROMPT, Core, Server, model  # noqa: F401 - model is a fixture


def _scope(path: str, body: bytes, spec: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


async def _gone_after_first_token(app, path: str, payload: dict, spec: str) -> list[dict]:
    """POST payload; the client goes away once the app has its first token, before the response starts.

    receive: the body, then (the app's disconnect watch while the request waits for its first token) nothing
    until cancelled, then http.disconnect while the response's start is being sent (spec 2.3, uvicorn's);
    a spec 2.4 server reports the disconnect by failing that send instead."""
    body, calls, sent = json.dumps(payload).encode(), 0, []

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if calls == 2 or spec >= "2.4":
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if spec >= "2.4":
            raise OSError("the client is gone")
        if message["type"] == "http.response.start":
            await asyncio.sleep(0.05)  # the socket's buffer is full: uvicorn waits for it to drain
        sent.append(message)

    await app(_scope(path, body, spec), receive, send)  # a 2.4 disconnect (ClientDisconnect) is not re-raised
    return sent


def _wait_idle(core: Core, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")):
        assert time.monotonic() < deadline, f"the abandoned stream still runs: {core.runner.stats()}"
        time.sleep(0.02)


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.parametrize("n", [1, 2])
def test_disconnect_between_first_token_and_stream_start_aborts_it(model, spec, n, caplog):  # noqa: F811
    """The client leaves after the first token but before the server-sent events begin: every choice is
    aborted (its place freed at once, not after max_tokens) and the request is counted once, as a 499
    (cancelled). Under spec 2.4 the failed send reached the 500 handler, which logged it as a server bug, and
    the app raised ClientDisconnect to the server; it ends quietly now."""
    core = Core(*model, max_num_seqs=4, max_model_len=512)
    core.dispatcher.delay_s = 0.01  # >= 20 ms a step: 450 tokens take >= 9 s
    try:
        payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "stream": True, "n": n,
                   "ignore_eos": True, "temperature": 0}
        sent = asyncio.run(_gone_after_first_token(build_openai_app(core), "/v1/completions", payload, spec))
        assert not [m for m in sent if m.get("body")], "nothing reaches a client that left"
        _wait_idle(core, timeout=4.0)
        assert core.metrics.errors == {"499": 1} and core.metrics.requests == {("http", "cancelled"): 1}
        quiet(caplog)
    finally:
        core.runner.close()


def _exported(base_url: str) -> dict[str, float]:
    """GET /metrics: series (name and labels) -> value, as Prometheus scrapes them."""
    with urllib.request.urlopen(base_url.rsplit("/v1", 1)[0] + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def test_a_request_with_n_choices_counts_once_in_the_exported_metrics(model):  # noqa: F811
    """Three requests of 3, 3 (streamed) and 2 choices are three requests, each with one e2e latency; one of
    4 choices with room for 3 is one 429."""
    core = Core(*model, max_num_seqs=3, max_queue=0, max_model_len=256)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    try:
        assert len(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3).choices) == 3
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3, stream=True))
        assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2}
        assert len(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, n=2).choices) == 2
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=4)
        got = _exported(server.url)
        assert got['elasticmoe_requests_total{api="http",status="ok"}'] == 3
        assert got['elasticmoe_requests_total{api="http",status="rejected"}'] == 1
        assert got['elasticmoe_request_errors_total{code="429"}'] == 1
        assert got['elasticmoe_latency_observations_total{kind="e2e"}'] == 3
        assert got['elasticmoe_latency_observations_total{kind="ttft"}'] == 3
    finally:
        server.stop()
        core.runner.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_with_n_choices_refused_by_the_engine_counts_once(model, stream):  # noqa: F811
    """n=3 with max_tokens past the context (refused as each choice is queued): one 400, counted once."""
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=500, n=3, stream=stream)
        assert e.value.body["param"] == "max_tokens"
        assert core.metrics.requests == {("http", "invalid"): 1} and core.metrics.errors == {"400": 1}
    finally:
        server.stop()
        core.runner.close()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_a_client_gone_while_sending_its_body_is_a_499_not_a_server_error(model, path, caplog):  # noqa: F811
    """The client leaves half-way through its body: counted once as a 499 (as a client gone later is), no error
    logged as a server bug, nothing raised to the server."""
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).encode()
    messages = [{"type": "http.request", "body": body[:7], "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else await asyncio.Event().wait()

    async def send(message: dict) -> None:
        sent.append(message)

    try:
        asyncio.run(build_openai_app(core)(_scope(path, body, "2.3"), receive, send))
        assert sent[0]["status"] == 499 and "client_disconnected" in sent[1]["body"].decode()
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        assert core.metrics.errors == {"499": 1} and core.metrics.requests == {("http", "cancelled"): 1}
    finally:
        core.runner.close()


async def _gone_at(app, path: str, payload: dict, spec: str, when) -> tuple[list[dict], list]:
    """POST payload; the client goes away as the app sends the first message `when(message)` holds for: that send
    waits as on a full socket buffer while http.disconnect comes (2.3), or it and every later send fail (2.4).
    Returns (the messages the client got, the app's tasks still pending once it returned)."""
    body, gone, sent, calls = json.dumps(payload).encode(), asyncio.Event(), [], 0

    async def receive() -> dict:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if not gone.is_set() and when(message):
            gone.set()
        if gone.is_set():
            if spec >= "2.4":
                raise OSError("the client is gone")
            await asyncio.sleep(0.05)
            return  # uvicorn drops what is sent on a closed connection
        sent.append(message)

    await app(_scope(path, body, spec), receive, send)  # raises nothing to the server
    await asyncio.sleep(0)  # a task the app cancelled as it returned ends now
    return sent, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


def _nth_finish(n: int):
    """when(): the message that carries the n-th finish_reason (streamed) or the reply's start (not streamed)."""
    seen = [0]

    def when(message: dict) -> bool:
        if message["type"] == "http.response.start":
            return message["headers"] and dict(message["headers"]).get(b"content-type") == b"application/json"
        seen[0] += message.get("body", b"").count(b'"finish_reason": "length"')
        return seen[0] >= n
    return when


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_after_its_last_token_stays_one_ok(model, spec, stream, caplog):  # noqa: F811
    """Every choice has its last token (the engine is done with the request) and the client leaves as the reply is
    written: the request is one ok, as gRPC and an unstreamed reply count it, and nothing is logged or raised. A
    stream whose last choice's final event was being written was counted as a 499: its ok came only once that
    event had gone out."""
    core = Core(*model, max_num_seqs=4, max_model_len=512)
    try:
        payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "stream": stream, "n": 2, "ignore_eos": True,
                   "temperature": 0}
        sent, left = asyncio.run(_gone_at(build_openai_app(core), "/v1/completions", payload, spec, _nth_finish(2)))
        assert not [m for m in sent if b"[DONE]" in m.get("body", b"")] and left == []
        if not stream:  # the disconnect came as the reply began: the client got nothing of it
            assert sent == []
        _wait_idle(core, timeout=4.0)
        assert core.metrics.requests == {("http", "ok"): 1} and core.metrics.errors == {}
        quiet(caplog)
    finally:
        core.runner.close()


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_client_gone_mid_stream_stops_every_choice_at_once_and_quietly(model, spec, caplog):  # noqa: F811
    """n=2, the client gone after a few events: both choices are aborted, the request is one 499 (cancelled), and
    when the app returns none of its tasks is left. The client gone while an event was being sent (2.3) or failing
    that send (2.4) left the event generator at its yield, its two pumps running until the garbage collector closed
    it; under 2.4 ClientDisconnect also reached the 500 handler (a logged traceback) and the server."""
    core = Core(*model, max_num_seqs=4, max_model_len=512)
    core.dispatcher.delay_s = 0.005  # >= 10 ms a step: 300 tokens take >= 3 s
    events = [0]

    def fourth_event(message: dict) -> bool:
        events[0] += message.get("body", b"").startswith(b"data: {")
        return events[0] > 4
    try:
        payload = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "stream": True, "n": 2, "ignore_eos": True,
                   "temperature": 0}
        sent, left = asyncio.run(_gone_at(build_openai_app(core), "/v1/completions", payload, spec, fourth_event))
        assert left == [] and len([m for m in sent if m.get("body", b"").startswith(b"data: {")]) == 4
        _wait_idle(core, timeout=2.0)  # aborted: not after 300 tokens
        assert core.metrics.requests == {("http", "cancelled"): 1} and core.metrics.errors == {"499": 1}
        quiet(caplog)
    finally:
        core.runner.close()
