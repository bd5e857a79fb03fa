"""The Serve deployment's Generate and GenerateStream over a real engine, without Ray: a stream that Serve closes or
a unary call it cancels (its client left) aborts its request at once, as the direct port's does
(tests/test_cancel_grpc.py), and is counted as cancelled."""

from __future__ import annotations

import asyncio
import time

import pytest

from elasticmoe import SamplingParams
from elasticmoe.client import make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.deployment import Gateway
from elasticmoe.gateway.generation_service import GenerationService
from tests.cancel_util import NEIGHBOUR, VICTIM, assert_aborted, at_stage, gated, victims
from tests.openai_util import PROMPT, Core, llm, model  # noqa: F401 - the module-scoped fixtures

GREEDY = dict(temperature=0.0, ignore_eos=True)


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
        assert len(at_close) == 1 and counted == {("grpc", "cancelled"): 1}
        deadline = time.monotonic() + 10
        while core.runner.stats()["admitted"]:  # the slot is freed
            assert time.monotonic() < deadline, core.runner.stats()
            time.sleep(0.02)
    finally:
        core.runner.close()


@pytest.mark.parametrize("stage", ["queued", "decode"])
def test_a_unary_call_serve_cancels_is_aborted_and_spares_its_neighbour(model, llm, stage):  # noqa: F811
    """Serve cancels the deployment's Generate when its client leaves: held while the request is queued or
    mid-decode, the cancel aborts it before the engine's next step, counts it once as cancelled, and the
    neighbour's tokens are those it gets alone."""
    slots = 1 if stage == "queued" else 2
    core, gate = gated(model, max_num_seqs=slots, max_model_len=512, max_num_batched_tokens=16)
    core.api_keys = ApiKeys()
    gateway = object.__new__(Gateway.func_or_class)
    gateway.service = GenerationService(core)
    nids = core.tokenizer.encode(NEIGHBOUR)
    alone = llm.generate([NEIGHBOUR], SamplingParams(max_tokens=24, **GREEDY))[0].token_ids

    async def go():
        beside = asyncio.ensure_future(gateway.Generate(make_request(NEIGHBOUR, max_tokens=24, **GREEDY)))
        await asyncio.to_thread(gate.hold)
        call = asyncio.ensure_future(gateway.Generate(make_request(VICTIM, max_tokens=200, **GREEDY)))
        await asyncio.to_thread(gate.step_until, at_stage(core, nids, stage))
        held = victims(core, nids)
        tokens = [len(s.output_ids) for s in held]
        call.cancel()  # what Serve does once the client is gone
        try:
            await call
        except asyncio.CancelledError:
            pass
        counted = dict(core.metrics.requests)  # the engine still held: the cancel landed at `stage`
        gate.release()
        return held, tokens, counted, await beside

    try:
        held, tokens, counted, reply = asyncio.run(go())
        assert counted == {("grpc", "cancelled"): 1} and core.metrics.errors == {"CANCELLED": 1}
        assert list(reply.token_ids) == list(alone)
        assert_aborted(core, held, tokens, slots)
        assert core.metrics.requests == {("grpc", "cancelled"): 1, ("grpc", "ok"): 1}
    finally:
        gate.release()
        core.runner.close()
