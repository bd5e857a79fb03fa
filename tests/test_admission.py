"""Admission never waits for the engine loop: while a step is held mid-flight, requests are admitted, bad ones
rejected (InvalidRequest) and a full gateway answered (QueueFull) at once; everything admitted then completes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.scheduler import QueueFull
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import LocalDispatcher
from tests.store_util import tiny_mixtral

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
FAST_S = 1.0  # admission while the step is held answers within this (it would wait out the 30 s hold if it waited)


class HeldDispatcher(LocalDispatcher):
    """In-process experts; after `hold(after)`, the dispatch past the next `after` blocks until `release()`."""

    def __init__(self, store):
        super().__init__(store)
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()
        self._free_calls = 0

    def hold(self, after: int = 0) -> None:
        self.entered.clear()
        self._free_calls = after
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    @property
    def holding(self) -> bool:
        return not self._gate.is_set()

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if not self._gate.is_set() and self._free_calls:
            self._free_calls -= 1
        elif not self._gate.is_set():
            self.entered.set()
            self._gate.wait(30)
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_mixtral(tmp_path_factory.mktemp("adm"))


def _timed(fn):
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
        return e, time.perf_counter() - t0


async def _collect(stream) -> list[int]:
    out: list[int] = []
    async for u in stream:
        out += u.token_ids
    return out


def test_submit_answers_at_once_while_a_step_is_held(model):
    path, files, store = model
    llm = LLM(path)
    prompts = [llm.encode(p) for p in ("The sea is", "Once upon a time", "A B C")]
    ref = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    disp = HeldDispatcher(store)
    runner = EngineRunner(Engine(files, disp, max_num_seqs=1, max_queue=1, max_model_len=64))

    async def go():
        disp.hold(after=len(files.spec.moe.moe_layers))  # "a"'s prefill step runs; its first decode step holds
        first = runner.generate("a", prompts[0], GREEDY)
        head = list((await first.__anext__()).token_ids)  # running (held before its 2nd token, however slow we are)
        assert await asyncio.to_thread(disp.entered.wait, 10)  # the engine thread is now stuck inside a step
        queued, t_ok = _timed(lambda: runner.generate("b", prompts[1], GREEDY))
        bad, t_bad = _timed(lambda: runner.generate("c", prompts[2], SamplingParams(max_tokens=0)))
        full, t_full = _timed(lambda: runner.generate("d", prompts[2], GREEDY))
        assert disp.entered.is_set() and disp.holding  # still held: none of the above waited for it
        disp.release()
        return head + await _collect(first), await _collect(queued), (t_ok, t_bad, t_full), bad, full

    try:
        a, b, times, bad, full = asyncio.run(go())
    finally:
        disp.release()
        runner.close()
    assert isinstance(bad, InvalidRequest) and bad.field == "max_tokens"
    assert isinstance(full, QueueFull)  # 1 running + 1 waiting: at capacity
    assert max(times) < FAST_S, times
    assert (a, b) == (ref[0], ref[1])


def test_serve_sends_a_gateway_no_more_calls_than_its_places():
    """build_app: Serve's max_ongoing_requests is the gateway's places (max_num_seqs + max_queue) unless
    limits.max_ongoing_requests says otherwise; Serve's own refusals are HTTP 429 with Retry-After 1."""
    from elasticmoe.app import build_app

    def options(limits: dict):
        return build_app({"model": "tiny:mixtral", "limits": limits})._bound_deployment

    gateway = options({"max_num_seqs": 8, "max_queue": 8, "max_queued_requests": 3})
    assert (gateway.max_ongoing_requests, gateway.max_queued_requests) == (16, 3)
    assert (gateway.backpressure_config.status_code, gateway.backpressure_config.retry_after_s) == (429, 1)
    assert options({"max_num_seqs": 4, "max_queue": 0}).max_ongoing_requests == 4
    assert options({"max_num_seqs": 4, "max_ongoing_requests": 1024}).max_ongoing_requests == 1024
