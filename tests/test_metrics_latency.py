"""The latency histograms through the real servers (the direct gRPC port, the OpenAI app under uvicorn) over a real
engine: what interval TTFT, TPOT and end-to-end latency measure, the same on both APIs."""

from __future__ import annotations

import asyncio

from openai import OpenAI

from elasticmoe.client import GenerationClient
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.metrics import GatewayMetrics
from tests.openai_util import MODEL, PROMPT, Core, Server, model  # noqa: F401 - the module-scoped tiny model fixture


class Recording(GatewayMetrics):
    """The gateway's metrics, keeping each latency observed (GatewayMetrics without Ray keeps only their counts)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen: dict[str, list[float]] = {"ttft": [], "tpot": [], "e2e": []}

    def _observe(self, name: str, seconds: float) -> None:
        self.seen[name].append(seconds)
        super()._observe(name, seconds)


def _core(model, **limits) -> Core:  # noqa: F811
    core = Core(*model, **limits)
    m = core.metrics
    core.metrics = Recording(m.mode, m.num_layers, m.num_experts, m.moe_layers, use_ray=False)
    core.api_keys = ApiKeys()
    return core


def test_ttft_starts_at_arrival_on_both_apis_including_the_wait_for_the_shards(model):  # noqa: F811
    """The shards take 0.4 s to be ready: a client waits that long for its first token, on either API. gRPC
    started its clock after the wait (HTTP before it), so one histogram held two intervals."""
    core = _core(model, max_num_seqs=2, max_model_len=128)
    wait = 0.4

    async def slow_ready() -> None:
        await asyncio.sleep(wait)
    core.wait_ready = slow_ready
    port = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=4)
    server = Server(build_openai_app(core))
    grpc_client = GenerationClient(port.address, timeout_s=60)
    try:
        grpc_client.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
        stream = grpc_client.stream(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len(list(stream)) >= 1
        http = OpenAI(base_url=server.url, api_key="none", max_retries=0)
        http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
        list(http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
        seen = core.metrics.seen
        assert core.metrics.requests == {("grpc", "ok"): 2, ("http", "ok"): 2}
        assert len(seen["ttft"]) == len(seen["e2e"]) == 4
        assert min(seen["ttft"]) >= wait and min(seen["e2e"]) >= wait, seen
    finally:
        grpc_client.close()
        port.stop(0)
        server.stop()
        core.runner.close()


def test_tpot_is_per_choice_over_its_own_tokens(model):  # noqa: F811
    """n choices: each observes its own TPOT (its first token to its last, over its own tokens); one value was
    observed per request, choice 0's tokens dividing the time since the first token of any choice."""
    core = _core(model, max_num_seqs=4, max_model_len=128)
    server = Server(build_openai_app(core))
    try:
        http = OpenAI(base_url=server.url, api_key="none", max_retries=0)
        for stream in (False, True):
            got = http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3,
                                          n=3, stream=stream, extra_body={"ignore_eos": True})
            if stream:
                list(got)
        seen = core.metrics.seen
        assert core.metrics.requests == {("http", "ok"): 2} and len(seen["ttft"]) == len(seen["e2e"]) == 2
        assert len(seen["tpot"]) == 6, seen
        for i, e2e in enumerate(seen["e2e"]):  # a choice's 7 gaps after its first token fit in its request's time
            assert all(0 < t <= e2e / 7 for t in seen["tpot"][3 * i:3 * i + 3]), seen
    finally:
        server.stop()
        core.runner.close()
