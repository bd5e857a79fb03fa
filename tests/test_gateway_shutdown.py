"""A gateway that stops while requests wait for its expert shards: they end at once with a clear answer (HTTP 503,
gRPC UNAVAILABLE, "the gateway is shutting down"), not after the readiness wait's 300 s. Real parts: a tiny
checkpoint, a real controller on an event loop (no shard ever joins it), a GatewayCore, uvicorn and the direct
gRPC port over it, and the real clients."""

from __future__ import annotations

import threading
import time

import grpc
import openai
from openai import OpenAI

from elasticmoe.client import GenerationClient
from elasticmoe.gateway.deployment import GatewayCore
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from tests.controller_util import _args, _LoopHandle, controller  # noqa: F401 - a fixture
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.openai_util import Server

WAIT_S = 60  # how long the test waits for the answers: a bound, not a timing (they come at once)


def _counting_readiness(core: GatewayCore) -> list[int]:
    """core.wait_ready as it is, counting the requests that entered it."""
    entered, real = [], core.wait_ready

    async def wait_ready(*args, **kw):
        entered.append(1)
        return await real(*args, **kw)

    core.wait_ready = wait_ready
    return entered


def test_requests_waiting_for_the_shards_end_at_once_when_the_gateway_stops(model, controller):  # noqa: F811
    """Before, GatewayCore.close() (and a replica's stop, which sets `stopped`) left them waiting for a table that
    no poller would bring: up to 300 s, then "expert shards are not ready"."""
    ctrl, loop = controller
    core = GatewayCore(_args(model, num_shards=1), _LoopHandle(ctrl, loop))
    entered = _counting_readiness(core)
    http = Server(build_openai_app(core))
    port = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=8)
    grpc_client = GenerationClient(port.address, timeout_s=WAIT_S + 30)
    http_client = OpenAI(base_url=http.url, api_key="none", max_retries=0, timeout=WAIT_S + 30)
    answers: dict[str, object] = {}

    def ask(door: str) -> None:
        try:
            if door == "grpc":
                grpc_client.generate("Once upon a time", max_tokens=4)
            else:
                http_client.completions.create(model=core.args.model, prompt="Once upon a time", max_tokens=4)
            answers[door] = "served"
        except (grpc.RpcError, openai.APIStatusError) as e:
            answers[door] = e

    closed = False
    try:
        threads = [threading.Thread(target=ask, args=(door,)) for door in ("grpc", "http")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + WAIT_S
        while len(entered) < 2:
            assert time.monotonic() < deadline, "the requests never reached the readiness wait"
            time.sleep(0.02)
        assert not core.complete.is_set() and not answers  # no shard: both wait
        core.close()
        closed = True
        for t in threads:
            t.join(WAIT_S)
        assert set(answers) == {"grpc", "http"}, f"still waiting after {WAIT_S} s: {answers}"
        g, h = answers["grpc"], answers["http"]
        assert g.code() == grpc.StatusCode.UNAVAILABLE and g.details() == "the gateway is shutting down", g
        assert h.status_code == 503 and "the gateway is shutting down" in h.message, h
        assert core.metrics.requests == {("grpc", "rejected"): 1, ("http", "rejected"): 1}, core.metrics.requests
    finally:
        grpc_client.close()
        port.stop(0)
        http.stop()
        if not closed:
            core.close()
