"""An HTTP client that goes away (closes its connection) at each point of its request's life: waiting for the shards,
admitted but not yet in the engine, queued for a slot, in its prefill, and mid-decode; completions and chat,
streamed or not, one choice or two. The engine is held at the start of a step while the client leaves
(tests/cancel_util.py), so the test knows where the disconnect lands; then: every choice is aborted before its next
step, its slot and K/V freed, the request counted once as cancelled (499), nothing logged, and the request beside
it gets its tokens as alone. (A client gone after its last token: tests/test_openai_lifecycle.py.)

uvicorn on 127.0.0.1 over a real engine with in-process experts; the client leaving is a socket closed."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading

import pytest
from openai import OpenAI

from elasticmoe import SamplingParams
from elasticmoe.gateway.openai_api import build_openai_app
from tests.cancel_util import (K, NEIGHBOUR, STAGES, VICTIM, Readiness, assert_aborted, at_stage, gated, never_ran,
                               quiet, victims, wait_for)
from tests.openai_util import MODEL, Server, llm, model  # noqa: F401 - module-scoped fixtures

VARIANTS = [("completions", False, 1), ("completions", True, 2), ("chat", False, 2), ("chat", True, 1)]


@pytest.fixture(scope="module")
def reference(llm):  # noqa: F811
    """The neighbour's greedy tokens, alone."""
    return llm.generate([NEIGHBOUR], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].token_ids


@pytest.fixture
def logs(caplog):
    """caplog, with uvicorn's records too (its loggers do not propagate to the root)."""
    uvicorn = logging.getLogger("uvicorn")
    uvicorn.addHandler(caplog.handler)
    yield caplog
    uvicorn.removeHandler(caplog.handler)


def _payload(endpoint: str, stream: bool, n: int) -> dict:
    body = {"model": MODEL, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "n": n, "stream": stream}
    if stream:  # every chunk says how many tokens the client has been sent
        body["stream_options"] = {"continuous_usage_stats": True}
    if endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": VICTIM}]}
    return {**body, "prompt": VICTIM}


def _post(url: str, endpoint: str, payload: dict) -> socket.socket:
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    body = json.dumps(payload).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def _read_until_streamed(s: socket.socket, tokens: int) -> None:
    """Read the event stream until its usage says `tokens` completion tokens have been sent."""
    buf = b""
    s.settimeout(10)
    while max([int(x) for x in re.findall(rb'"completion_tokens": ?(\d+)', buf)] or [0]) < tokens:
        got = s.recv(65536)
        assert got, buf[-300:]
        buf += got


def _neighbour(url: str, got: list) -> threading.Thread:
    client = OpenAI(base_url=url, api_key="none", max_retries=0)

    def run() -> None:
        r = client.completions.create(model=MODEL, prompt=NEIGHBOUR, max_tokens=24, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        got.append([int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens])
    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("endpoint,stream,n", VARIANTS)
@pytest.mark.parametrize("stage", STAGES)
def test_a_client_gone_at_each_stage_is_aborted_counted_once_and_spares_its_neighbour(
        model, reference, logs, stage, endpoint, stream, n):  # noqa: F811
    slots = 1 if stage == "queued" else 1 + n
    core, gate = gated(model, max_num_seqs=slots, max_model_len=512, max_num_batched_tokens=16)
    ready = Readiness(core)
    server = Server(build_openai_app(core))
    nids = core.tokenizer.encode(NEIGHBOUR)
    got: list = []
    try:
        neighbour = _neighbour(server.url, got)
        gate.hold()  # at the neighbour's first step: it is in the engine (past readiness)
        ready.blocked = stage == "unready"
        conn = _post(server.url, endpoint, _payload(endpoint, stream, n))
        if stage == "unready":
            wait_for(lambda: ready.waiting == n, "the request never waited for the shards")
        elif stage == "inbox":
            wait_for(lambda: core.runner.stats()["admitted"] == 1 + n, "the request was never admitted")
            assert not victims(core, nids)  # admitted by the runner, not yet seen by the engine
        else:
            gate.step_until(at_stage(core, nids, stage))
        if stage == "decode" and stream:
            _read_until_streamed(conn, K * n)
        held = victims(core, nids)
        tokens = [len(s.output_ids) for s in held]
        assert len(held) == (0 if stage in ("unready", "inbox") else n), held
        beside = [s for s in core.runner.engine.seqs.values() if s.prompt_ids == nids]
        assert len(beside) == 1 and not beside[0].finished  # the neighbour runs beside it
        conn.close()
        wait_for(lambda: core.metrics.requests.get(("http", "cancelled")) == 1,  # while the engine stands still
                 f"the server never saw the client leave: {core.metrics.requests}")
        ready.blocked = False
        gate.release()
        neighbour.join(30)
        assert got == [list(reference)]
        assert_aborted(core, held, tokens, slots)
        never_ran(core, stage, held)
        assert core.metrics.requests == {("http", "ok"): 1, ("http", "cancelled"): 1}
        assert core.metrics.errors == {"499": 1}
        quiet(logs)
    finally:
        gate.release()
        ready.blocked = False
        server.stop()
        core.runner.close()
