"""The Serve deployment's GenerateStream over a real engine, without Ray: a stream that Serve closes (its client
left) aborts its request at once, as the direct port's does."""

from __future__ import annotations

import asyncio
import time

from elasticmoe.client import make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.deployment import Gateway
from elasticmoe.gateway.generation_service import GenerationService
from tests.openai_util import PROMPT, Core, model  # noqa: F401 - the module-scoped tiny model fixture


def test_a_stream_serve_closes_aborts_its_request_before_the_next_loop_turn(model):  # noqa: F811
    """Serve closes the deployment's generator when the client leaves. The inner generate_stream was left to
    asyncio's async-generator finalizer, so its request was aborted (and counted) only some loop turns later, or at
    the loop's shutdown where a reference kept it alive."""
    core = Core(*model, max_num_seqs=2, max_model_len=256)
    core.dispatcher.delay_s = 0.005  # a 200-token request lasts >= 2 s
    core.api_keys = ApiKeys()
    gateway = object.__new__(Gateway.func_or_class)  # what __init__ leaves for GenerateStream
    gateway.service = GenerationService(core)
    aborted: list[str] = []
    abort = core.runner.abort
    core.runner.abort = lambda key: (aborted.append(key), abort(key))

    async def client_leaves() -> tuple[list[str], dict]:
        stream = gateway.GenerateStream(make_request(PROMPT, max_tokens=200, temperature=0.0, ignore_eos=True))
        assert (await stream.__anext__()).token_ids
        await stream.aclose()  # what Serve does once the client is gone
        return list(aborted), dict(core.metrics.requests)

    try:
        at_close, counted = asyncio.run(client_leaves())
        assert len(at_close) == 1 and counted == {("grpc", "error"): 1}
        deadline = time.monotonic() + 10
        while core.runner.stats()["admitted"]:  # the slot is freed
            assert time.monotonic() < deadline, core.runner.stats()
            time.sleep(0.02)
    finally:
        core.runner.close()
