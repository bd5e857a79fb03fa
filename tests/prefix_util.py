"""Prefix-caching tests' shared parts: prompts sharing a prefix, greedy params, engines' runs counted per request, and
the comparisons against an engine without caching and transformers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.scheduler import Scheduler
from tests.hf_ref import assert_greedy_alone

SHARED = torch.randint(3, 400, (29,), generator=torch.Generator().manual_seed(7)).tolist()
PROMPTS = [SHARED + [11, 12, 13], SHARED + [21], SHARED[:20], SHARED]  # 32, 30, 20, 29 tokens
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)


def counted(sched: Scheduler, call) -> tuple[object, dict[str, int], list[list[tuple[str, int]]]]:
    """(call()'s result, prefill and decode tokens each request ran, each step's work as (request id, tokens)), of
    the work `sched` (an engine's scheduler) gave out meanwhile."""
    ran: dict[str, int] = {}
    steps: list[list[tuple[str, int]]] = []
    real = sched.schedule

    def schedule(*args):
        work = real(*args)
        steps.append([(seq.request_id, n) for seq, n in work])
        for seq, n in work:
            ran[seq.request_id] = ran.get(seq.request_id, 0) + n
        return work
    sched.schedule = schedule
    try:
        return call(), ran, steps
    finally:
        sched.schedule = real


def run(llm: LLM, prompts: list[list[int]], together: bool) -> tuple[list, dict[str, int]]:
    """(outputs, prefill and decode tokens each request ran): prompts in one generate call, or one call each."""
    outs, ran, _ = counted(llm.engine.scheduler, lambda: llm.generate(prompts, GREEDY) if together else
                           [llm.generate([p], GREEDY)[0] for p in prompts])
    return outs, ran


def same(a: list, b: list) -> None:
    """The same tokens, logprobs within float32 rounding (cached K/V came from other chunk shapes)."""
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert max(abs(p.logprob - q.logprob) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4


def assert_transformers_alone(path, prompts: list[list[int]], outs: list, n: int = 6) -> None:
    """Each of `outs` (RequestOutputs) has transformers' n greedy tokens for its prompt alone (hf_ref: one forward
    each, not one per token)."""
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert_greedy_alone(ref, prompts, [o.token_ids for o in outs], [n] * len(prompts))
