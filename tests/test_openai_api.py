"""The OpenAI HTTP API over a real engine (in-process experts) and uvicorn, called with the official client."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import json
import openai
import pytest
import torch
import uvicorn
from openai import OpenAI

from elasticmoe import LLM, SamplingParams
from elasticmoe.config import AppArgs
from elasticmoe.engine.engine import Engine
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about experts."}]


class SlowDispatcher(LocalDispatcher):
    """In-process experts, optionally slowed down so that a request outlives a client's patience, or failing
    (every copy of the experts gone: fault injection into our own dispatcher seam)."""

    delay_s = 0.0
    unavailable = False

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        time.sleep(self.delay_s)
        if self.unavailable:
            raise ExpertsUnavailable(f"injected: no live copy for layer {layer}")
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


class Core:
    """What the API needs of a GatewayCore: tokenizer, runner, args, wait_ready (and metrics)."""

    def __init__(self, path: str, store: ExpertStore, **limits: int):
        files = open_model(path)
        self.dispatcher = SlowDispatcher(store)
        engine = Engine(files, self.dispatcher, **limits)
        self.tokenizer, self.runner, self.args = engine.tokenizer, EngineRunner(engine), AppArgs(model=path)
        spec = files.spec
        self.metrics = GatewayMetrics("per_expert", len(spec.moe.sparse_layers), spec.moe.num_experts,
                                      spec.moe.moe_layers, use_ray=False)
        self.ready = True

    async def wait_ready(self) -> None:
        if not self.ready:
            raise TimeoutError("expert shards are not ready")


class Server:
    """uvicorn on 127.0.0.1 (ephemeral port) in a daemon thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(make_tiny_model("mixtral", tmp_path_factory.mktemp("oa") / "mixtral", layers=2, experts=4))
    files = open_model(path)
    spec = files.spec
    store = ExpertStore(files.ckpt, files.names, spec, torch.float32, torch.device("cpu"))
    store.load((l, e) for l in spec.moe.moe_layers for e in range(spec.moe.num_experts))
    return path, store


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model[0])


@pytest.fixture(scope="module")
def served(model):
    """(core, client) with room for 4 sequences of 128 tokens."""
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0)
    server.stop()
    core.runner.close()


def _greedy(llm: LLM, ids: list[int], n: int, **kw):
    return llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, **kw))[0]


def _chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out if isinstance(out, list) else out["input_ids"])


def _wait_idle(core: Core, timeout: float = 5.0) -> None:
    """Until nothing runs, waits or holds a place (the runner frees a place just after the engine drops its
    sequence, on the engine thread: reading both at once could see the one without the other)."""
    deadline = time.monotonic() + timeout
    while any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")):
        assert time.monotonic() < deadline, "the engine kept running an abandoned request"
        time.sleep(0.02)


def test_models_lists_the_served_model(served, model):
    _, client = served
    assert [m.id for m in client.models.list().data] == ["mixtral"]  # the directory's name, never its path
    out = client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=1)
    assert out.model == "mixtral" and model[0] not in out.model_dump_json()


@pytest.mark.parametrize("as_ids", [False, True])
def test_completion_greedy_equals_engine(served, llm, as_ids):
    _, client = served
    ids = llm.encode(PROMPT)
    ref = _greedy(llm, ids, 12, ignore_eos=True)
    r = client.completions.create(model="m", prompt=ids if as_ids else PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_completion_stream_equals_engine_and_reports_usage(served, llm):
    _, client = served
    ids = llm.encode(PROMPT)
    ref = _greedy(llm, ids, 20, ignore_eos=True)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_engine_on_the_chat_template(served, llm, stream):
    _, client = served
    ref = _greedy(llm, _chat_ids(llm.tokenizer, CHAT), 10, ignore_eos=True)
    kw = dict(model="m", messages=CHAT, max_completion_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = client.chat.completions.create(**kw)
        assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
        assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == len(ref.prompt_token_ids)
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_chat_default_max_tokens_fills_the_context(served):
    _, client = served
    r = client.chat.completions.create(model="m", messages=CHAT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == 128 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(served, llm, stream):
    _, client = served
    full = _greedy(llm, llm.encode(PROMPT), 20, ignore_eos=True).text
    stop = full[6:9]
    kw = dict(model="m", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in client.completions.create(**kw, stream=True) if c.choices]
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == full[: full.find(stop)] and finish == "stop"


def test_completion_logprobs_shape(served):
    _, client = served
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0


def test_chat_logprobs_shape(served):
    _, client = served
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:  # greedy: the sampled token is the most likely one
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert isinstance(t.bytes, list) and t.bytes


@pytest.mark.parametrize("kw,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"), ({"logit_bias": {"5": 300}}, "logit_bias[5]"),
    ({"logit_bias": {"x": 3}}, "logit_bias"), ({"logit_bias": {"100000": 3}}, "logit_bias"),
    ({"logit_bias": {"\u00b2": 3}}, "logit_bias"),
    ({"prompt": ["one", "two"]}, "prompt"), ({"prompt": [1, 10**9]}, "prompt"), ({"max_tokens": 500}, "max_tokens"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"), ({"max_tokens": "many"}, "max_tokens"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"), ({"extra_body": {"min_tokens": 5}}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids[0]"),
    ({"stream": True, "stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo"),
    ({"extra_body": {"best_of": 2}}, "best_of"), ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_fields_are_openai_400s(served, kw, param):
    _, client = served
    args = {"model": "m", "prompt": PROMPT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert e.value.body["message"] and e.value.body["code"] is None


@pytest.mark.parametrize("kw,param", [
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_bad_chat_fields_are_openai_400s(served, kw, param):
    _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "m", "messages": CHAT, "max_tokens": 4, **kw})
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_invalid_json_is_a_400(served):
    _, client = served
    req = urllib.request.Request(f"{client.base_url}completions", data=b"{not json", method="POST",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_not_ready_is_a_503(served):
    core, client = served
    core.ready = False
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="m", prompt=PROMPT, max_tokens=2)
    finally:
        core.ready = True
    assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"


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
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=90, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    _wait_idle(core)
    assert core.runner.stats()["steps"] - steps < 80


def test_disconnect_before_a_non_streamed_response_aborts_the_request(slow):
    core, client = slow  # 120 tokens take >= 1.2 s: the client gives up after 0.3 s
    steps, gone = core.runner.stats()["steps"], core.metrics.errors.get("499", 0)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).completions.create(model="m", prompt="Hi", max_tokens=120, temperature=0,
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
        busy = client.completions.create(model="m", prompt=PROMPT, max_tokens=200, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # running: the only slot is taken and no one may wait
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_exceeded"
        assert e.value.response.headers["retry-after"] == "1"
        busy.close()
        _wait_idle(core)
        core.dispatcher.delay_s = 0.0
        assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
        assert core.metrics.requests[("http", "rejected")] == 1 and core.metrics.errors["429"] == 1
    finally:
        server.stop()
        core.runner.close()


def test_requests_are_counted_in_metrics(served):
    core, client = served
    before = dict(core.metrics.requests), dict(core.metrics.latency_counts)
    client.completions.create(model="m", prompt=PROMPT, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=-1)
    assert core.metrics.requests[("http", "ok")] == before[0].get(("http", "ok"), 0) + 1
    assert core.metrics.requests[("http", "invalid")] == before[0].get(("http", "invalid"), 0) + 1
    assert core.metrics.latency_counts["e2e"] == before[1]["e2e"] + 1


@pytest.mark.parametrize("kw,param", [
    ({"prompt": "\ud800"}, "prompt"), ({"seed": 2**64}, "seed"), ({"temperature": 1e-300}, "temperature"),
])
def test_inputs_that_used_to_be_500s_are_400s_and_spare_the_requests_in_flight(served, llm, kw, param):
    """A lone surrogate, a seed over 64 bits and an underflowing temperature: 400 naming the field, while a
    greedy stream already running finishes with exactly its reference text."""
    _, client = served
    ref = _greedy(llm, llm.encode(PROMPT), 16, ignore_eos=True)
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    body = json.dumps({"model": "m", "prompt": PROMPT, "max_tokens": 4, **kw}).encode()  # "\\ud800" escaped
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
            client.completions.create(model="m", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 503 and e.value.body["type"] == "service_unavailable"
        assert e.value.response.headers["retry-after"] == "1" and "injected" not in e.value.body["message"]
    finally:
        core.dispatcher.unavailable = False
        engine.retry_backoff_s = backoff
    assert client.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_disconnect_while_a_stream_waits_for_its_first_token_aborts_it(model):
    """A streamed request queued behind a busy one, its client gone before the first token: it never runs."""
    core = Core(*model, max_num_seqs=1, max_model_len=512)
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    core.dispatcher.delay_s = 0.005  # >= 10 ms a step
    try:
        steps, gone = core.runner.stats()["steps"], core.metrics.errors.get("499", 0)
        busy = client.completions.create(model="m", prompt=PROMPT, max_tokens=300, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # the only slot is taken: the next request waits in the queue
        with pytest.raises(openai.APITimeoutError):
            client.with_options(timeout=0.3).completions.create(model="m", prompt="Hi", max_tokens=400, stream=True,
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
            client.completions.create(model="m", prompt=PROMPT, max_tokens=400, n=2, temperature=0,
                                      extra_body={"ignore_eos": True})
        _wait_idle(core, timeout=2.0)  # the choice left running would take >= 4 s
    finally:
        server.stop()
        core.runner.close()
