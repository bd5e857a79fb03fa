"""One request's failure inside the engine thread's loop (its detokenization, its stop-string check, its abort, the
zeroing of its KV slot as it ends) ends that request only: its neighbours finish with the tokens of a solo run and the
runner serves on. A real engine over a tiny Mixtral, experts in-process; faults injected into the tokenizer it is
given and the KV cache's zeroing (a device error)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model.dispatch import LocalDispatcher
from tests.test_admission import HeldDispatcher, model  # noqa: F401 - model: a fixture, a tiny Mixtral
from tests.store_util import FussyTokenizer

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
WARM = dataclasses.replace(GREEDY, max_tokens=40)
PROMPTS = ["The expert said", "Once upon a time", "Mixture of experts routes", "A B C D"]
AFTER = "The sea is"


def zeroing_fails_once(engine: Engine) -> list[int]:
    """The engine's KV cache, whose first zeroing of a slot raises (a device error); returns the slots zeroed."""
    real, calls = engine.cache.clear, []

    def clear(slot: int, length: int, blocks=None) -> None:
        calls.append(slot)
        if len(calls) == 1:
            raise RuntimeError("injected: CUDA error: an illegal memory access was encountered")
        real(slot, length, blocks)
    engine.cache.clear = clear
    return calls


@pytest.fixture(scope="module")
def reference(model):  # noqa: F811
    """Each prompt's greedy tokens from LLM.generate, one request at a time, and a token id none of them uses."""
    llm = LLM(model[0])
    ref = {p: llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS + [AFTER]}
    ref["warm"] = llm.generate([PROMPTS[0]], WARM)[0].token_ids
    used = {t for p in PROMPTS + [AFTER] for t in ref[p] + llm.encode(p)} | set(ref["warm"])
    return llm, ref, min(set(range(100, 400)) - used)


async def _collect(stream) -> list[int]:
    out: list[int] = []
    async for u in stream:
        out += u.token_ids
    return out


def _serves_on(runner: EngineRunner, llm: LLM, ref: dict) -> None:
    """A request after the failure gets its reference tokens; nothing is left held (places, slots, sequences)."""
    async def after():
        return await asyncio.wait_for(_collect(runner.generate("after", llm.encode(AFTER), GREEDY)), 60)

    assert asyncio.run(after()) == ref[AFTER]
    engine = runner.engine
    assert runner._thread.is_alive() and runner.stats()["admitted"] == 0
    assert engine.scheduler.num_free_slots == 16 and engine.held_slots == {} and engine.seqs == {}


@pytest.mark.parametrize("stop", [(), ("never there",)], ids=["detokenizing", "stop_string_check"])
def test_a_text_failure_whose_slot_zeroing_raises_ends_that_request_alone(model, reference, stop):  # noqa: F811
    """A request forced (logit_bias) onto a token its tokenizer cannot decode: with no stop strings its text fails
    as the runner publishes it, with one as the engine looks for it in its step. Ending it zeroes its KV slot, and
    that raises (a device error). Before, the first killed the engine thread (every request then ended 'shutting
    down'), the second made the step raise with the rows after its own counted run yet given no token (never
    scheduled again: their clients waited forever). Now it alone ends (RequestFailed), its slot is zeroed by the
    next step, and the neighbours (one running before it, four admitted beside it) get their solo tokens."""
    llm, ref, bad = reference
    _, files, store = model
    disp = HeldDispatcher(store)
    engine = Engine(files, disp, max_model_len=64, tokenizer=FussyTokenizer(llm.tokenizer, bad))
    zeroed = zeroing_fails_once(engine)
    runner = EngineRunner(engine)
    forced = dataclasses.replace(GREEDY, logit_bias={bad: 100.0}, stop=stop)

    async def go():
        disp.hold(after=len(files.spec.moe.moe_layers))  # the warm request's prefill runs; its next step holds
        warm = runner.generate("warm", llm.encode(PROMPTS[0]), WARM)
        head = list((await warm.__anext__()).token_ids)
        assert await asyncio.to_thread(disp.entered.wait, 30)
        streams = [runner.generate("bad", llm.encode(PROMPTS[1]), forced)]  # first: its row comes before theirs
        streams += [runner.generate(p, llm.encode(p), GREEDY) for p in PROMPTS]
        disp.release()  # the next step runs the warm decode, then the five prefills (the bad one first)
        out = await asyncio.wait_for(asyncio.gather(_collect(warm), *map(_collect, streams),
                                                    return_exceptions=True), 60)
        return [out[0] if isinstance(out[0], BaseException) else head + out[0]] + out[1:]

    try:
        out = asyncio.run(go())
        assert isinstance(out[1], RequestFailed) and "could not be served" in str(out[1]), out[1]
        assert out[0] == ref["warm"] and out[2:] == [ref[p] for p in PROMPTS]
        _serves_on(runner, llm, ref)
        assert zeroed[:2] == [zeroed[0]] * 2  # the slot whose zeroing failed was zeroed by the next step
        assert engine.failed_requests == 1
    finally:
        disp.release()
        runner.close()


def test_an_abort_whose_slot_zeroing_raises_ends_that_request_alone(model, reference):  # noqa: F811
    """A client closes its stream mid-generation; zeroing its KV slot raises (a device error). Before, the abort
    killed the engine thread: its neighbours ended 'shutting down' and the runner refused everything after. Now
    the abort completes (its slot held back until the next step zeroes it) and the neighbours get their solo
    tokens."""
    llm, ref, _ = reference
    _, files, store = model
    disp = HeldDispatcher(store)
    engine = Engine(files, disp, max_model_len=64)
    zeroed = zeroing_fails_once(engine)
    runner = EngineRunner(engine)

    async def go():
        disp.hold(after=len(files.spec.moe.moe_layers))
        quitter = runner.generate("quitter", llm.encode(PROMPTS[0]), WARM)
        await quitter.__anext__()  # running: its slot holds its K/V
        assert await asyncio.to_thread(disp.entered.wait, 30)
        tasks = [asyncio.ensure_future(_collect(runner.generate(p, llm.encode(p), GREEDY))) for p in PROMPTS]
        await asyncio.sleep(0)  # admitted (in the inbox, behind the abort below)
        await quitter.aclose()
        disp.release()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    try:
        assert asyncio.run(go()) == [ref[p] for p in PROMPTS]
        _serves_on(runner, llm, ref)
        assert zeroed[:2] == [zeroed[0]] * 2
    finally:
        disp.release()
        runner.close()


def test_requests_admitted_while_a_slot_is_held_back_wait_their_turn(model, reference):  # noqa: F811
    """A slot held back (its zeroing raised as its request was aborted) until the next step zeroes it left the
    scheduler one slot short of the runner's capacity (max_num_seqs + max_queue): a request the runner had admitted
    was refused (QueueFull, HTTP 429, counted in refused). Now the held slot counts as the free slot it is about to
    be: all three requests admitted while it is held (capacity 3) wait their turn and get their solo tokens."""
    llm, ref, _ = reference
    _, files, store = model
    engine = Engine(files, LocalDispatcher(store), max_model_len=64, max_num_seqs=2, max_queue=1)
    zeroed = zeroing_fails_once(engine)
    idle, go = threading.Event(), threading.Event()
    runner = EngineRunner(engine, on_idle=lambda: (idle.set(), go.wait(30)))  # idle: the engine thread waits

    async def run():
        quitter = runner.generate("quitter", llm.encode(PROMPTS[0]), WARM)
        await quitter.__anext__()
        await quitter.aclose()  # aborted (its zeroing raises: its slot held); the engine then idles in on_idle
        assert await asyncio.to_thread(idle.wait, 30)
        assert list(engine.held_slots) == zeroed and runner.stats()["admitted"] == 0
        streams = [runner.generate(p, llm.encode(p), GREEDY) for p in PROMPTS[:3]]  # one inbox drain adds all
        go.set()
        return await asyncio.wait_for(asyncio.gather(*map(_collect, streams), return_exceptions=True), 60)

    try:
        assert asyncio.run(run()) == [ref[p] for p in PROMPTS[:3]]
        assert runner.stats()["refused"] == 0 and zeroed == [zeroed[0]] * 2 and engine.held_slots == {}
    finally:
        go.set()
        runner.close()


class WakeFails(asyncio.SelectorEventLoop):
    """An event loop that refuses to be woken from the engine thread (its own failure, not a closed loop's
    RuntimeError): a request's stream on it cannot be pushed to."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        if threading.current_thread().name == "engine":
            raise ValueError("injected: the loop refused a callback")
        return super().call_soon_threadsafe(callback, *args, context=context)


def test_a_stream_whose_push_raises_ends_that_request_alone(model, reference):  # noqa: F811
    """One client's event loop raises as the engine thread wakes it. Before, the push's error killed the engine
    thread: every request ended 'shutting down' and the runner refused all after. Now that request alone ends
    (RequestFailed, there for its client to read) and its neighbours, admitted beside it, get their solo tokens."""
    llm, ref, _ = reference
    _, files, store = model
    runner = EngineRunner(Engine(files, LocalDispatcher(store), max_model_len=64))
    admitted, got = threading.Event(), []

    async def stranded():
        stream = runner.generate("stranded", llm.encode(PROMPTS[0]), WARM)
        admitted.set()
        with pytest.raises(TimeoutError):  # never woken: its loop refused
            await asyncio.wait_for(stream.__anext__(), 5)
        try:
            await stream.__anext__()  # what the runner left for it
        except RequestFailed as e:
            got.append(e)

    def client():
        loop = WakeFails()
        try:
            loop.run_until_complete(stranded())
        finally:
            loop.close()

    async def neighbours():
        assert await asyncio.to_thread(admitted.wait, 30)
        return await asyncio.wait_for(asyncio.gather(*(_collect(runner.generate(p, llm.encode(p), GREEDY))
                                                       for p in PROMPTS), return_exceptions=True), 60)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert asyncio.run(neighbours()) == [ref[p] for p in PROMPTS]
        thread.join(30)
        assert len(got) == 1 and "could not be served" in str(got[0]), got
        _serves_on(runner, llm, ref)
        assert runner.stats()["request_errors"] == 1 and runner.engine.failed_requests == 1
    finally:
        runner.close()
        thread.join(30)


def test_a_prompt_its_tokenizer_cannot_decode_ends_that_request_alone(model, reference):  # noqa: F811
    """A prompt ending in a token the tokenizer fails to decode (its text is decoded after the prompt's last
    tokens). Before, the tokenizer's own ValueError went to the client (HTTP 500 'internal server error', gRPC
    INTERNAL: a bug here); now RequestFailed as for any request the engine could not serve (503 / UNAVAILABLE),
    counted in failed_requests; its neighbours get their solo tokens and the runner serves on."""
    llm, ref, bad = reference
    _, files, store = model
    runner = EngineRunner(Engine(files, LocalDispatcher(store), max_model_len=64,
                                 tokenizer=FussyTokenizer(llm.tokenizer, bad)))

    async def go():
        reqs = [(llm.encode(PROMPTS[0]) + [bad], GREEDY)] + [(llm.encode(p), GREEDY) for p in PROMPTS]
        return await asyncio.wait_for(asyncio.gather(*(_collect(runner.generate("r", ids, p)) for ids, p in reqs),
                                                     return_exceptions=True), 60)

    try:
        out = asyncio.run(go())
        assert isinstance(out[0], RequestFailed) and isinstance(out[0].__cause__, ValueError), repr(out[0])
        assert out[1:] == [ref[p] for p in PROMPTS]
        _serves_on(runner, llm, ref)
        assert runner.engine.failed_requests == 1
    finally:
        runner.close()
