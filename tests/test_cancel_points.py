"""GenerationService.start / generate / generate_stream over a real EngineRunner and engine (the tiny Mixtral), each
call cancelled at every point of its life: at each of its first loop turns (readiness, an off-loop tokenizing, the
wait for the first update, a stream's write of a reply) and then after each engine step of three calls' life beside
each other (queued for a slot, in its prefill, between tokens, after its last). Whatever the order, no admitted place
leaks (`admitted`, the runner's _live, and the scheduler come back to empty); a call cancelled before its last reply
was aborted (the runner told at once, not left to run out its tokens) and counted once as cancelled (and CANCELLED
among the errors); one that had its last reply was counted ok and not aborted; a refused prompt invalid."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

import pytest

from elasticmoe.client import make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.tokenizing import OFF_LOOP_CHARS
from tests.cancel_util import wait_for
from tests.openai_util import PROMPT, Core, model  # noqa: F401 - the module-scoped fixture

SLOTS = 2
TURNS = 10  # the first loop turns, one cancel at each
MAX_TOKENS = 40
STEPS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 41, 55, 85, 110)  # cancels after this many engine steps
LONG = "word " * (OFF_LOOP_CHARS // 5 + 1)  # tokenized off the loop; then refused (beyond the context)


class _Ready:
    """core.wait_ready that yields to the loop a few times (the shards' readiness is awaited, not instant)."""

    async def __call__(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)


class _Calls:
    """The calls made on one service, each under its own request_id; which the runner admitted and aborted."""

    def __init__(self, core: Core):
        self.service, self.n = GenerationService(core), 0
        self.admitted: set[str] = set()
        self.aborted: set[str] = set()
        runner = core.runner
        generate, abort = runner.generate, runner.abort  # recorded, then called: the real runner does the work
        runner.generate = lambda rid, ids, params: (generate(rid, ids, params), self.admitted.add(rid))[0]
        runner.abort = lambda key: (self.aborted.add(key.rsplit("#", 1)[0]), abort(key))[1]

    async def call(self, kind: str, prompt: str, rid: str, ended: set[str]) -> None:
        req = make_request(prompt, request_id=rid, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        if kind == "unary":
            await self.service.generate(req)
            ended.add(rid)
            return
        async with contextlib.aclosing(self.service.generate_stream(req)) as replies:  # as the servicer does
            async for r in replies:
                if r.finish_reason:
                    ended.add(rid)
                await asyncio.sleep(0)  # gRPC writing the reply: a cancel can land here, the last one's too

    async def cancelled_after(self, kind: str, prompt: str, turns: int, until: Callable[[], bool] | None = None,
                              ended: set[str] | None = None) -> tuple[str, str]:
        """(request_id, how the call ended: ok once it had its last reply, else cancelled or invalid), cancelled
        after `turns` loop turns and then once `until()` holds (None: never cancelled)."""
        self.n += 1
        rid, ended = f"call-{self.n}", set() if ended is None else ended
        task = asyncio.ensure_future(self.call(kind, prompt, rid, ended))
        for _ in range(turns):
            await asyncio.sleep(0)
        if until is None:
            await asyncio.wait([task])
        while until is not None and not until() and not task.done():
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - the refusal of the long prompt
            return rid, "invalid" if "prompt" in str(e) else f"failed: {e!r}"
        return rid, "ok" if rid in ended else "cancelled"


def _after_steps(core: Core, n: int) -> Callable[[], bool]:
    """Whether the engine took `n` more steps since now (its progress, whatever the machine's speed)."""
    start = core.runner.engine.steps
    return lambda: core.runner.engine.steps >= start + n


def _idle(core: Core) -> None:
    wait_for(lambda: not any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")),
             f"a cancelled call kept its place: {core.runner.stats()}", timeout=30)
    engine = core.runner.engine
    assert engine.seqs == {} and engine.scheduler.num_free_slots == SLOTS
    assert core.runner._live == 0


@pytest.mark.parametrize("kind", ["unary", "stream"])
def test_a_call_cancelled_at_any_point_is_aborted_frees_its_place_and_is_counted_once(model, kind):  # noqa: F811
    core = Core(*model, max_num_seqs=SLOTS, max_model_len=128, max_queue=64)
    core.api_keys = ApiKeys()
    core.wait_ready = _Ready()
    calls = _Calls(core)

    async def run() -> dict[str, str]:
        ends = [await calls.cancelled_after(kind, p, 0) for p in (PROMPT, LONG)]  # uncancelled
        assert [e for _, e in ends] == ["ok", "invalid"]
        for turns in range(1, TURNS + 1):
            ends += [await calls.cancelled_after(kind, p, turns, lambda: True) for p in (PROMPT, LONG)]
            _idle(core)
        for n in STEPS:  # three at once: two hold the slots, the third waits for one
            ends += await asyncio.gather(*(calls.cancelled_after(kind, PROMPT, 1, _after_steps(core, n + j))
                                           for j in range(3)))
            _idle(core)
        return dict(ends)

    try:
        ends = asyncio.run(run())
        assert not [e for e in ends.values() if e not in ("ok", "cancelled", "invalid")], ends
        n = {e: list(ends.values()).count(e) for e in ("ok", "cancelled", "invalid")}
        assert n["cancelled"] >= TURNS and n["ok"] >= 2, n  # cancels landed before and after the end
        requests, errors, _ = core.metrics.counts()
        assert requests == {("grpc", e): c for e, c in n.items() if c}, (requests, ends)
        assert errors == {k: c for k, c in (("CANCELLED", n["cancelled"]), ("INVALID_ARGUMENT", n["invalid"])) if c}
        assert calls.aborted == {r for r, e in ends.items() if e == "cancelled"} & calls.admitted
        _idle(core)
    finally:
        core.runner.close()
