"""A bug while serving an OpenAI request (an exception no handler expected) is a 500 counted as one: in
elasticmoe_requests_total{api="http",status="error"} and request_errors_total{code="500"}, once. Over a real engine
and uvicorn with the official client; the bug is injected at two seams: the readiness check raising (before the
first token, as tests/test_direct_ingress.py injects one on gRPC) and the tokenizer failing as the API names logprob
tokens (after the engine served them, while the response is shaped)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from tests.openai_util import CHAT, MODEL, PROMPT, Core, Server
from tests.openai_util import model  # noqa: F401 - the fixture

ERROR = {("http", "error"): 1}


class LogprobNamesFail:
    """The model's tokenizer, except that naming tokens (batch_decode, which the API's logprobs call) raises."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kw):
        return self.tokenizer(*args, **kw)

    def batch_decode(self, *args, **kw):
        raise RuntimeError("injected: a bug naming logprob tokens")


@pytest.fixture
def served(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=256)
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0)
    server.stop()
    core.runner.close()


def _still_serving(core, client) -> None:
    """The next request is served and counted ok beside the one error (on a new connection: uvicorn closes one
    whose request raised, after the 500 went out)."""
    client = OpenAI(base_url=str(client.base_url), api_key="none", max_retries=0)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert core.metrics.requests == {**ERROR, ("http", "ok"): 1} and core.metrics.errors == {"500": 1}


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_bug_before_the_first_token_is_a_500_counted_as_an_error(served, chat, stream):
    """The 500 handler answered "internal server error (RuntimeError)" but counted nothing: a server failing every
    request showed no errors in requests_total, request_errors_total or the dashboard's error ratio."""
    core, client = served

    async def broken() -> None:
        raise RuntimeError("injected: a bug in the readiness check")
    core.wait_ready = broken
    with pytest.raises(openai.InternalServerError) as e:
        if chat:
            client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, stream=stream)
        else:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=stream)
    assert e.value.status_code == 500 and e.value.body["message"] == "internal server error (RuntimeError)"
    assert core.metrics.requests == ERROR and core.metrics.errors == {"500": 1}
    del core.wait_ready  # the class's again
    _still_serving(core, client)


def test_a_bug_shaping_an_unstreamed_response_is_a_500_counted_once(served):
    """Every token generated, the response's logprobs fail to name them: a 500, counted once (the request's
    outcome had not been recorded: that happens once its body is built)."""
    core, client = served
    core.tokenizer = LogprobNamesFail(core.tokenizer)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1)
    assert core.metrics.requests == ERROR and core.metrics.errors == {"500": 1}
    core.tokenizer = core.tokenizer.tokenizer
    _still_serving(core, client)


def test_a_bug_mid_stream_is_an_error_event_counted_as_a_500_not_a_client_gone(served):
    """The same bug in a streamed response, once its 200 has gone out: it escaped the event stream, which counted it
    as a client gone (cancelled, 499) and cut the connection with no word. Now an error event says what failed (as
    an engine failure mid-stream is told), the stream ends, and the request counts as a 500."""
    core, client = served
    core.tokenizer = LogprobNamesFail(core.tokenizer)
    with pytest.raises(openai.APIError) as e:
        list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, logprobs=1, stream=True))
    assert e.value.message == "internal server error (RuntimeError)", e.value
    assert core.metrics.requests == ERROR and core.metrics.errors == {"500": 1}
    core.tokenizer = core.tokenizer.tokenizer
    _still_serving(core, client)


def test_a_bug_in_tokenize_is_a_500_counted_as_an_error(served):
    """/tokenize counts its answers and its 400s; its 500s were not counted."""
    core, client = served
    core.tokenizer = LogprobNamesFail(core.tokenizer)
    core.tokenizer.convert_ids_to_tokens = core.tokenizer.batch_decode  # return_token_strs names the tokens
    base = str(client.base_url).removesuffix("/v1/")
    req = urllib.request.Request(f"{base}/tokenize", json.dumps({"prompt": PROMPT, "return_token_strs": True}).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 500 and json.loads(e.value.read())["error"]["type"] == "server_error"
    assert core.metrics.requests == ERROR and core.metrics.errors == {"500": 1}


@pytest.mark.parametrize("chat", [False, True])
def test_a_bug_shaping_the_streams_last_chunk_is_a_500_not_ok(served, chat):
    """max_tokens=1: the stream's one update is its last, so the request has ended when its chunk is shaped. The
    outcome was counted ok before that chunk was built, and the bug's 500 then counted nothing (a timing-dependent
    ok in the test above, under load). The chunk is built first now."""
    core, client = served
    core.tokenizer = LogprobNamesFail(core.tokenizer)
    with pytest.raises(openai.APIError) as e:
        if chat:
            list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, logprobs=True,
                                                top_logprobs=1, stream=True))
        else:
            list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logprobs=1, stream=True))
    assert e.value.message == "internal server error (RuntimeError)", e.value
    assert core.metrics.requests == ERROR and core.metrics.errors == {"500": 1}
    core.tokenizer = core.tokenizer.tokenizer
    _still_serving(core, client)
