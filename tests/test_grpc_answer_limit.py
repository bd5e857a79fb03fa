"""A unary Generate answer over the message limit (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, 4 MiB as elasticmoe starts Ray:
with logprobs 20, some 20,000 tokens). Serve's proxy failed such a call "SERVER: Sent message larger than max (21039
vs. 16384)" once the whole completion had run, naming no cause, and the gateway counted it ok. Now the gateway holds
the answer to the same limit: INVALID_ARGUMENT naming logprobs (max_tokens without) and GenerateStream as the way
out, the request aborted as soon as the answer passes the limit, counted invalid, the server serving on.

A real grpc.aio server with the proxy's send limit (here 16 KiB) over a real engine, its gateway given the same
limit through the variable, as a gateway replica has it from its Ray node."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from elasticmoe.client import GenerationClient
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.generation_service import GenerationService, GenerationServicer
from elasticmoe.rpc.generation_wire import add_generation_to_server
from elasticmoe.rpc.options import PROXY_MESSAGE_ENV, answer_bytes
from tests.cancel_util import wait_for
from tests.openai_util import PROMPT, Core, model  # noqa: F401 - the module-scoped tiny model fixture

LIMIT = 16 << 10
LONG = dict(max_tokens=400, temperature=0.0, ignore_eos=True)  # some 210 bytes a token with logprobs 20


class Proxy:
    """A grpc.aio server sending at most `limit` bytes a message (as Serve's proxy, with RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
    set), serving a GenerationService built while the variable says `limit`."""

    def __init__(self, core, limit: int, monkeypatch):
        monkeypatch.setenv(PROXY_MESSAGE_ENV, str(limit))
        self.service = GenerationService(core)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(limit), self.loop).result(30)
        self.client = GenerationClient(f"127.0.0.1:{port}", timeout_s=120)

    async def _start(self, limit: int):
        server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                          ("grpc.max_receive_message_length", limit)])
        add_generation_to_server(GenerationServicer(self.service), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def close(self) -> None:
        self.client.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def core(model):  # noqa: F811
    core = Core(*model, max_num_seqs=2, max_model_len=512)
    core.api_keys = ApiKeys()
    yield core
    core.runner.close()


def _idle(core) -> None:
    wait_for(lambda: not any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")),
             f"the engine still holds the request: {core.runner.stats()}")
    assert core.runner.engine.seqs == {} and core.runner.engine.scheduler.num_free_slots == 2


def test_an_answer_past_the_limit_is_refused_naming_logprobs_and_generate_stream(core, monkeypatch):
    proxy = Proxy(core, LIMIT, monkeypatch)
    try:
        assert proxy.service.max_answer_bytes == LIMIT
        before, steps = dict(core.metrics.requests), core.runner.stats()["steps"]
        with pytest.raises(grpc.RpcError) as e:
            proxy.client.generate(PROMPT, logprobs=20, **LONG)
        code, details = e.value.code(), e.value.details()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith(f"logprobs: the answer is over {LIMIT} bytes at "), details
        assert "use GenerateStream" in details and "fewer max_tokens or logprobs" in details, details
        assert "retry-after" not in dict(e.value.trailing_metadata() or ())  # no retry cures it
        _idle(core)
        ran = core.runner.stats()["steps"] - steps
        assert ran < 120, f"the request ran {ran} steps of its 400 tokens: not aborted at the limit"
        counted = {k: v - before.get(k, 0) for k, v in core.metrics.requests.items() if v != before.get(k, 0)}
        assert counted == {("grpc", "invalid"): 1}, counted
        chunks = list(proxy.client.stream(PROMPT, logprobs=20, **LONG))  # the way out: every message fits
        assert sum(len(c.token_ids) for c in chunks) == 400 and all(c.ByteSize() <= LIMIT for c in chunks)
        assert proxy.client.generate(PROMPT, logprobs=20, max_tokens=8).usage.completion_tokens == 8
        _idle(core)
    finally:
        proxy.close()


@pytest.mark.parametrize("logprobs,field", [(None, "max_tokens"), (2, "logprobs")])
def test_the_limit_is_the_answers_exact_size(core, monkeypatch, logprobs, field):
    """An answer of exactly the limit's bytes is sent (so the proxy would); one byte less and it is refused, on the
    answer's exact size (text, usage and all: beyond the running bound), naming the field that grew it."""
    kw = dict(logprobs=logprobs, max_tokens=40, temperature=0.0, ignore_eos=True)
    big = Proxy(core, 4 << 20, monkeypatch)
    try:
        size = big.client.generate(PROMPT, request_id="r", **kw).ByteSize()
    finally:
        big.close()
    exact = Proxy(core, size, monkeypatch)
    try:
        assert exact.client.generate(PROMPT, request_id="r", **kw).ByteSize() == size
    finally:
        exact.close()
    short = Proxy(core, size - 1, monkeypatch)
    try:
        with pytest.raises(grpc.RpcError) as e:
            short.client.generate(PROMPT, request_id="r", **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(f"{field}: the answer is {size} bytes for 40 tokens, over {size - 1}")
        _idle(core)
    finally:
        short.close()


def test_the_limit_is_the_proxys_variable_else_4_mib(monkeypatch):
    monkeypatch.delenv(PROXY_MESSAGE_ENV, raising=False)
    assert answer_bytes() == 4 << 20
    monkeypatch.setenv(PROXY_MESSAGE_ENV, "1048576")
    assert answer_bytes() == 1 << 20
    monkeypatch.setenv(PROXY_MESSAGE_ENV, "4MiB")
    with pytest.raises(ValueError, match=f"^{PROXY_MESSAGE_ENV}='4MiB': expected a positive number of bytes"):
        answer_bytes()
