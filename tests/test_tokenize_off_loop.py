"""A long prompt is tokenized off the event loop (gateway/tokenizing.py): while one is being tokenized (held here
inside the real tokenizer until released), the same door answers a short request; tokenizing on the loop would
stall every other request's stream for as long (about a second a MiB). HTTP (completions, chat) over uvicorn and
gRPC (the direct port's GenerationService), each over a real engine with in-process experts."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from elasticmoe.client import GenerationClient
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.tokenizing import OFF_LOOP_CHARS
from tests.openai_util import CHAT, MODEL, PROMPT, Core, Server
from tests.openai_util import model  # noqa: F401 - the fixture

LONG = "word " * (OFF_LOOP_CHARS // 5 + 1)  # over the threshold, and over the 128-token context: a 400 once read


class _HeldTokenizer:
    """The real tokenizer; encoding a text of OFF_LOOP_CHARS or more waits for `release`, noting its thread."""

    def __init__(self, tok):
        self.tok, self.entered, self.release, self.threads = tok, threading.Event(), threading.Event(), []

    def _hold(self, text) -> None:
        if isinstance(text, str) and len(text) >= OFF_LOOP_CHARS:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.release.wait(60)

    def encode(self, text, **kw):
        self._hold(text)
        return self.tok.encode(text, **kw)

    def __call__(self, text, **kw):
        self._hold(text)
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def core(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    yield core
    core.runner.close()


def _while_held(core, send_long, send_short, expect: str = "refused") -> None:
    """send_long() in a thread until its tokenizing is held, then send_short() must finish; then release. send_long
    returns how its request ended: `expect` (by default refused, too long for the context)."""
    real, held = core.tokenizer, _HeldTokenizer(core.tokenizer)
    core.tokenizer, outcome = held, []
    t = threading.Thread(target=lambda: outcome.append(send_long()))
    t.start()
    try:
        assert held.entered.wait(30), "the long prompt was never tokenized"
        send_short()  # answered while the long prompt's tokenizing is held
    finally:
        held.release.set()
        t.join(60)
        core.tokenizer = real
    assert held.threads and all(name.startswith("tokenize") for name in held.threads), held.threads
    assert outcome == [expect], outcome  # the long request ended as it should


@pytest.mark.parametrize("body,expect", [({"prompt": LONG}, "answered"),
                                         ({"messages": [{"role": "user", "content": LONG}]}, "refused")],
                         ids=["prompt", "chat"])
def test_http_answers_while_a_long_prompt_is_tokenized_at_tokenize(core, body, expect):
    """POST /tokenize (vLLM's) tokenized on the event loop: a long prompt there held every stream as long. A prompt
    is counted whatever its length (as vLLM counts it); chat messages are held to the context, as chat is."""
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=20)
    try:
        def send_long():
            req = urllib.request.Request(server.url.removesuffix("/v1") + "/tokenize", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=60)
            except urllib.error.HTTPError as e:  # over the context
                return "refused" if e.code == 400 else str(e.code)
            return "answered"

        _while_held(core, send_long, lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2),
                    expect)
    finally:
        server.stop()


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_http_answers_while_a_long_prompt_is_tokenized(core, chat):
    server = Server(build_openai_app(core))
    client = OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=20)
    try:
        def send_long():
            try:
                if chat:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": LONG}],
                                                   max_tokens=1)
                else:
                    client.completions.create(model=MODEL, prompt=LONG, max_tokens=1)
            except openai.BadRequestError:
                return "refused"
            return "answered"

        def send_short():
            if chat:
                assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).choices
            else:
                assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None

        _while_held(core, send_long, send_short)
    finally:
        server.stop()


def test_grpc_answers_while_a_long_prompt_is_tokenized(core):
    import grpc

    core.api_keys = ApiKeys()
    port = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=16)
    client = GenerationClient(port.address, timeout_s=20)
    try:
        def send_long():
            try:
                client.generate(LONG, max_tokens=1)
            except grpc.RpcError as e:
                return "refused" if e.code() == grpc.StatusCode.INVALID_ARGUMENT else e.code()
            return "answered"

        _while_held(core, send_long, lambda: client.generate(PROMPT, max_tokens=2))
    finally:
        client.close()
        port.stop(0)
