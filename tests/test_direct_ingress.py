"""The gateway's direct gRPC port (`direct_grpc`) without Ray: a real grpc.aio server over a real engine answers
like LLM.generate, refuses bad or excess requests with the gRPC status and keeps serving, frees a cancelled
call's place, drains calls in flight when it stops, and names the setting when its port is taken."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest
from pydantic import ValidationError

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from elasticmoe.config import AppArgs, DirectGrpc
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from tests.test_openai_api import Core, model  # noqa: F401 - the module-scoped tiny model fixture

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
GREEDY = dict(temperature=0.0, ignore_eos=True)


def _port(core, max_rpcs: int = 16) -> DirectIngress:
    core.api_keys = ApiKeys()
    return DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=max_rpcs)


def _wait_idle(core, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while core.runner.stats()["admitted"]:
        assert time.monotonic() < deadline, core.runner.stats()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    llm = LLM(model[0])
    return llm.generate([llm.encode(PROMPT)], SamplingParams(max_tokens=24, **GREEDY))[0]


def test_the_port_answers_like_llm_generate_and_survives_bad_input(model, reference):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        unary = client.generate(PROMPT, max_tokens=24, **GREEDY)
        chunks = list(client.stream(PROMPT, max_tokens=24, **GREEDY))
        assert list(unary.token_ids) == list(reference.token_ids) and unary.text == reference.text
        assert [t for c in chunks for t in c.token_ids] == list(reference.token_ids)
        assert "".join(c.text for c in chunks) == reference.text and len(chunks) > 1
        for kw, field in [({"temperature": 1e-45}, "temperature"), ({"max_tokens": 10**6}, "max_tokens")]:
            with pytest.raises(grpc.RpcError) as e:
                client.generate(PROMPT, **kw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details(), kw
        assert list(client.generate(PROMPT, max_tokens=24, **GREEDY).token_ids) == list(reference.token_ids)
        assert core.metrics.requests[("grpc", "invalid")] == 2 and core.metrics.requests[("grpc", "ok")] == 3
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_a_full_gateway_refuses_at_once_and_a_cancelled_call_frees_its_place(model):  # noqa: F811
    core = Core(*model, max_num_seqs=1, max_queue=0, max_model_len=256)
    core.dispatcher.delay_s = 0.005  # a 200-token request lasts >= 2 s
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        busy = client.stream(PROMPT, max_tokens=200, **GREEDY)
        next(busy)  # running: the only place is taken
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - t0 < 1.0
        assert dict(e.value.trailing_metadata())["retry-after"] == "1"
        steps = core.runner.stats()["steps"]
        busy.cancel()
        _wait_idle(core)
        assert core.runner.stats()["steps"] - steps < 100  # aborted, not run to its 200 tokens
        core.dispatcher.delay_s = 0.0
        assert client.generate(PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        client.close()
        port.stop(0)
        core.runner.close()


def test_stop_drains_the_calls_in_flight_and_refuses_new_ones(model, reference):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    core.dispatcher.delay_s = 0.01  # 24 tokens x 2 layers: about 0.5 s
    port = _port(core)
    client = GenerationClient(port.address, timeout_s=60)
    got: list[int] = []
    ended: list[float] = []

    def read(stream) -> None:
        for c in stream:
            got.extend(c.token_ids)
        ended.append(time.monotonic())

    try:
        stream = client.stream(PROMPT, max_tokens=24, **GREEDY)
        first = next(stream)
        got.extend(first.token_ids)
        reader = threading.Thread(target=read, args=(stream,))
        reader.start()
        in_flight_at_stop = len(got)
        assert port.alive()
        port.stop(30)
        finished_at_stop = core.metrics.requests.get(("grpc", "ok"), 0)  # the server's side, when stop() returned
        reader.join(timeout=30)
        assert 0 < in_flight_at_stop < 24  # the stop began mid-stream
        assert got == list(reference.token_ids) and ended  # drained: not cut
        assert finished_at_stop == 1  # stop() returned only once the call had finished
        assert not port.alive()
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        core.runner.close()


def test_a_taken_port_names_the_setting(model):  # noqa: F811
    core = Core(*model, max_num_seqs=1, max_model_len=64)
    taken = socket.socket()  # no SO_REUSEPORT: nobody else may bind it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError, match=rf"direct_grpc: cannot listen on 127\.0\.0\.1:{taken.getsockname()[1]}"):
            _port_at(core, taken.getsockname()[1])
    finally:
        taken.close()
        core.runner.close()


def _port_at(core, number: int) -> DirectIngress:
    core.api_keys = ApiKeys()
    return DirectIngress(GenerationService(core), "127.0.0.1", number, max_rpcs=4)


def test_direct_grpc_settings_are_checked():
    assert AppArgs(model="m", direct_grpc={"port": 9100}).direct_grpc == DirectGrpc(port=9100)
    assert DirectGrpc(port=9100).host == "127.0.0.1"
    for bad in ({"port": 0}, {"port": 70000}, {"port": 9100, "tls": True}, {"port": 9100, "drain_s": -1}, {}):
        with pytest.raises(ValidationError):
            AppArgs(model="m", direct_grpc=bad)
