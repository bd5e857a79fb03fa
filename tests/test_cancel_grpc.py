"""A gRPC client that goes away (it cancels, or its deadline passes), unary and streaming, at each point of its
request's life: waiting for the shards, admitted but not yet in the engine, queued for a slot, in its prefill,
mid-decode, and after its last token. The engine is held at the start of a step while the client leaves (tests/
cancel_util.py), so the test knows where the cancel lands; then: the request is aborted before its next step, its
slot and K/V freed, counted once as cancelled, nothing logged, and the request beside it gets its tokens as alone.

A real grpc.aio server (the direct port, which serves the same GenerationService as Serve's proxy) over a real
engine with in-process experts, called by the real client."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import pytest

from elasticmoe import SamplingParams
from elasticmoe.client import GenerationClient, make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from tests.cancel_util import (K, NEIGHBOUR, STAGES, VICTIM, Readiness, assert_aborted, at_stage, gated, never_ran,
                               quiet, victims, wait_for)
from tests.openai_util import llm, model  # noqa: F401 - module-scoped fixtures

GREEDY = dict(temperature=0.0, ignore_eos=True)
CODES = {"cancel": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED}  # as the client sees it


@pytest.fixture(scope="module")
def reference(llm):  # noqa: F811
    """The neighbour's greedy tokens, alone."""
    return llm.generate([NEIGHBOUR], SamplingParams(max_tokens=24, **GREEDY))[0].token_ids


class _Door:
    """The direct port over a gated core, a client, and the neighbour's unary call running in a thread."""

    def __init__(self, model, service_cls=GenerationService, **limits):  # noqa: F811
        self.core, self.gate = gated(model, max_model_len=512, max_num_batched_tokens=16, **limits)
        self.ready = Readiness(self.core)
        self.core.api_keys = ApiKeys()
        self.service = service_cls(self.core)
        self.port = DirectIngress(self.service, "127.0.0.1", 0, max_rpcs=16)
        self.client = GenerationClient(self.port.address, timeout_s=60)
        self.got: list = []

    def neighbour(self) -> threading.Thread:
        t = threading.Thread(target=lambda: self.got.append(self.client.generate(NEIGHBOUR, max_tokens=24, **GREEDY)))
        t.start()
        return t

    def call(self, kind: str, timeout: float, prompt: str = VICTIM, max_tokens: int = 200):
        req = make_request(prompt, request_id="victim", max_tokens=max_tokens, **GREEDY)
        method = self.client.stub.Generate.future if kind == "unary" else self.client.stub.GenerateStream
        return method(req, metadata=self.client.metadata, timeout=timeout)

    def close(self) -> None:
        self.gate.release()
        self.ready.blocked = False
        self.client.close()
        self.port.stop(0)
        self.core.runner.close()


def _reach(door: _Door, call, kind: str, stage: str, nids: list[int]) -> None:
    """With the engine held: bring the victim to `stage` and prove it is there."""
    core, gate = door.core, door.gate
    if stage == "unready":
        wait_for(lambda: door.ready.waiting == 1, "the call never waited for the shards")
    elif stage == "inbox":
        wait_for(lambda: core.runner.stats()["admitted"] == 2, "the call was never admitted")
        assert not victims(core, nids)  # admitted by the runner, not yet seen by the engine
    else:
        gate.step_until(at_stage(core, nids, stage))
    if stage == "decode" and kind == "stream":
        streamed = 0
        while streamed < K:  # what the client has read: K tokens
            streamed += len(next(call).token_ids)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_a_client_gone_at_each_stage_is_aborted_counted_once_and_spares_its_neighbour(
        model, reference, caplog, kind, stage, how):  # noqa: F811
    slots = 1 if stage == "queued" else 2
    door = _Door(model, max_num_seqs=slots)
    core, gate = door.core, door.gate
    nids = door.core.tokenizer.encode(NEIGHBOUR)
    try:
        neighbour = door.neighbour()
        gate.hold()  # at the neighbour's first step: it is in the engine (past readiness)
        door.ready.blocked = stage == "unready"
        call = door.call(kind, timeout=3.0 if how == "deadline" else 60)  # 3 s: time to reach the stage
        _reach(door, call, kind, stage, nids)
        held = victims(core, nids)
        tokens = [len(s.output_ids) for s in held]
        beside = [s for s in core.runner.engine.seqs.values() if s.prompt_ids == nids]
        assert len(beside) == 1 and not beside[0].finished  # the neighbour runs beside it
        if how == "cancel":
            call.cancel()
        wait_for(lambda: core.metrics.requests.get(("grpc", "cancelled")) == 1,  # while the engine stands still
                 f"the server never saw the client leave: {core.metrics.requests}")
        door.ready.blocked = False
        gate.release()
        neighbour.join(30)
        assert call.code() == CODES[how]
        assert list(door.got[0].token_ids) == list(reference)
        assert_aborted(core, held, tokens, slots)
        never_ran(core, stage, held)
        assert core.metrics.requests == {("grpc", "ok"): 1, ("grpc", "cancelled"): 1}
        assert core.metrics.errors == {"CANCELLED": 1}  # the server sees a deadline as the cancel it is
        quiet(caplog)
    finally:
        door.close()


class _PausedAtTheEnd(GenerationService):
    """The real service, with a pause once its reply is ready (the last token counted) and before gRPC has it:
    where a client that leaves now lands. `paused` is set there; `left` records the cancel's arrival."""

    def __init__(self, core):
        super().__init__(core)
        self.paused, self.go, self.left = threading.Event(), threading.Event(), []

    async def _pause(self) -> None:
        self.paused.set()
        try:
            while not self.go.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.left.append(True)
            raise

    async def generate(self, request, grpc_context=None):
        reply = await super().generate(request, grpc_context)
        await self._pause()
        return reply

    async def generate_stream(self, request, grpc_context=None):
        async with contextlib.aclosing(super().generate_stream(request, grpc_context)) as replies:
            async for r in replies:
                if r.finish_reason:
                    await self._pause()
                yield r


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_a_client_gone_after_its_last_token_is_counted_ok_once(model, caplog, kind):  # noqa: F811
    """The engine has finished the request (counted ok, its slot freed); the client leaves before the reply is
    written: it stays one ok, nothing is aborted or counted again, nothing is logged."""
    door = _Door(model, service_cls=_PausedAtTheEnd, max_num_seqs=2)
    core, service = door.core, door.service
    try:
        door.gate.release()
        call = door.call(kind, timeout=60, prompt=NEIGHBOUR, max_tokens=4)
        assert service.paused.wait(10)
        assert core.metrics.requests == {("grpc", "ok"): 1} and core.runner.stats()["admitted"] == 0
        assert core.runner.engine.seqs == {}  # finished: nothing left to abort
        call.cancel()
        wait_for(lambda: service.left, "the cancel never reached the handler")
        service.go.set()
        assert call.code() == grpc.StatusCode.CANCELLED
        assert core.metrics.requests == {("grpc", "ok"): 1} and core.metrics.errors == {}
        assert core.runner.engine.scheduler.num_free_slots == 2
        quiet(caplog)
    finally:
        door.close()


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_a_per_call_timeout_of_the_client_ends_its_call_and_frees_its_slot(model, reference, caplog,  # noqa: F811
                                                                           kind):
    """GenerationClient's `timeout=` on one call (the client's own default here: 60 s). The method took no such
    argument (TypeError: an unknown sampling field), so a caller's only deadline was the client's. Now a call past
    its own deadline mid-decode raises DEADLINE_EXCEEDED to the caller, the server aborts the request (its slot and
    K/V freed, counted once as cancelled) and the neighbour gets its tokens as alone; a timeout out of range is a
    ValueError naming `timeout`, before any call."""
    door = _Door(model, max_num_seqs=2)
    core, gate, client = door.core, door.gate, door.client
    nids = core.tokenizer.encode(NEIGHBOUR)
    for bad in (0, -1, float("nan"), 2e9, True, "5"):
        with pytest.raises(ValueError, match="^timeout: must be at most 1e\\+09 seconds and above 0"):
            (client.generate if kind == "unary" else client.stream)(VICTIM, timeout=bad, max_tokens=4)
    raised: list[grpc.RpcError] = []

    def victim() -> None:
        kw = dict(timeout=3.0, request_id="victim", max_tokens=200, **GREEDY)  # 3 s: time to reach mid-decode
        try:
            if kind == "unary":
                client.generate(VICTIM, **kw)
            else:
                list(client.stream(VICTIM, **kw))
        except grpc.RpcError as e:
            raised.append(e)
    try:
        neighbour = door.neighbour()
        gate.hold()
        caller = threading.Thread(target=victim)
        caller.start()
        gate.step_until(at_stage(core, nids, "decode"))
        held = victims(core, nids)
        assert len(held) == 1 and not held[0].finished  # mid-decode: K tokens out of 200
        tokens = [len(s.output_ids) for s in held]
        wait_for(lambda: core.metrics.requests.get(("grpc", "cancelled")) == 1,  # while the engine stands still
                 f"the server never saw the deadline pass: {core.metrics.requests}")
        caller.join(10)
        assert [e.code() for e in raised] == [grpc.StatusCode.DEADLINE_EXCEEDED]
        gate.release()
        neighbour.join(30)
        assert list(door.got[0].token_ids) == list(reference)
        assert_aborted(core, held, tokens, 2)
        assert core.metrics.requests == {("grpc", "ok"): 1, ("grpc", "cancelled"): 1}
        quiet(caplog)
    finally:
        door.close()


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_stream_the_caller_stops_reading_is_aborted(model, reference, caplog, how):  # noqa: F811
    """What a user of GenerationClient.stream does to stop early: leave the loop (the call, no longer referenced, is
    cancelled by gRPC as it is collected) or call cancel() on the stream. Either aborts the request on the server
    mid-decode: its slot and K/V freed, counted once as cancelled, the neighbour's tokens as alone."""
    door = _Door(model, max_num_seqs=2)
    core, gate = door.core, door.gate
    nids = core.tokenizer.encode(NEIGHBOUR)
    try:
        neighbour = door.neighbour()
        gate.hold()
        stream = door.client.stream(VICTIM, request_id="victim", max_tokens=200, **GREEDY)
        gate.step_until(at_stage(core, nids, "decode"))
        held = victims(core, nids)
        tokens = [len(s.output_ids) for s in held]
        read = 0
        for r in stream:  # K tokens out: the first of them have come
            read += len(r.token_ids)
            break
        if how == "break":
            del stream  # the loop's only reference: as a `for r in client.stream(...)` left by break drops it
        else:
            stream.cancel()
        wait_for(lambda: core.metrics.requests.get(("grpc", "cancelled")) == 1,  # while the engine stands still
                 f"the server never saw the caller stop: {core.metrics.requests}")
        gate.release()
        neighbour.join(30)
        assert read >= 1 and list(door.got[0].token_ids) == list(reference)
        assert_aborted(core, held, tokens, 2)
        assert core.metrics.requests == {("grpc", "ok"): 1, ("grpc", "cancelled"): 1}
        quiet(caplog)
    finally:
        door.close()
