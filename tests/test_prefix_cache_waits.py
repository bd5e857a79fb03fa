"""In-batch prefix caching: a prompt whose first blocks a sequence admitted before it is still prefilling waits for
them to be cached rather than compute them a second time beside it (SGLang's), and the prompts after it that share
no block with it are admitted meanwhile; the same tokens as without caching."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.scheduler import Scheduler, Sequence, Status
from elasticmoe.model.tiny import make_tiny_model
from tests.prefix_util import GREEDY, PROMPTS, counted, run, same


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("prefix_waits") / "mixtral", layers=2, experts=4)


@pytest.mark.parametrize("caching", [True, False])
def test_a_prompt_whose_prefix_is_being_prefilled_waits_for_its_blocks(caching):
    """Blocks of 4: b's 14 tokens start with a's first 12, which a (admitted in the same step) is prefilling and has
    not cached: b waits a step and then finds them cached, running 2 tokens
    instead of 14. d, sharing one block of its 16 tokens with a (less than half of what it runs), is admitted
    beside a. Without prefix caching no one waits."""
    shared = list(range(10, 22))
    a, d, b = (Sequence("a", shared + [50], GREEDY), Sequence("d", shared[:4] + list(range(200, 212)), GREEDY),
               Sequence("b", shared + [60, 61], GREEDY))
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(32, 4),
                      prefix_caching=caching)
    for seq in (a, d, b):
        sched.add(seq)

    def step():
        work = sched.schedule()
        for seq, n in work:
            seq.num_cached += n
            sched.written(seq)
            seq.output_ids.append(7)
        return work
    if not caching:
        assert step() == [(a, 13), (d, 16), (b, 14)]
        return
    assert step() == [(a, 13), (d, 16)] and b.status is Status.WAITING and d.cached_tokens == 0
    assert step() == [(a, 1), (d, 1), (b, 2)] and b.cached_tokens == 12 and sched.pool.hits(b) == 3


def _step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    """One engine step: the work counted run; a sequence whose last token ran has its blocks cached and draws."""
    work = sched.schedule()
    for seq, n in work:
        seq.num_cached += n
        if seq.num_cached == seq.num_tokens:
            sched.written(seq)
            seq.output_ids.append(7)
    return work


def test_those_behind_a_prompt_waiting_for_its_prefix_that_share_none_of_it_go_first():
    """Blocks of 4. w waits for a's first 12 tokens (a prefilling them): u, behind it and sharing no block with it,
    is admitted in the same step as a (it used to wait behind w); c, sharing w's first block (though it would not
    wait for a: one block of its 16 tokens), keeps its place behind w, so that nothing admitted ahead of w can
    prefill w's prefix. The next step w and c, in arrival order, find a's blocks cached."""
    shared = list(range(10, 22))
    a, w = Sequence("a", shared + [50], GREEDY), Sequence("w", shared + [60, 61], GREEDY)
    c, u = Sequence("c", shared[:4] + list(range(200, 212)), GREEDY), Sequence("u", list(range(300, 308)), GREEDY)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(32, 4),
                      prefix_caching=True)
    for seq in (a, w, c, u):
        sched.add(seq)
    assert _step(sched) == [(a, 13), (u, 8)] and list(sched.waiting) == [w, c]
    assert sched.free_slots == [3, 2] and [a.slot, u.slot] == [0, 1]
    assert _step(sched) == [(a, 1), (u, 1), (w, 2), (c, 12)] and not sched.waiting
    assert (w.cached_tokens, c.cached_tokens) == (12, 4)


def test_one_passed_over_keeps_its_turn_for_slots_and_blocks():
    """Two slots: w waits for a's prefix and u, behind it, takes the other slot; when a slot frees, w gets it before
    v (who came after it). A sequence passed over whose successor cannot reserve its blocks: nothing changes."""
    shared = list(range(10, 22))
    a, w, u, v = (Sequence("a", shared + [50], GREEDY), Sequence("w", shared + [60, 61], GREEDY),
                  Sequence("u", list(range(300, 308)), GREEDY), Sequence("v", list(range(400, 404)), GREEDY))
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(32, 4),
                      prefix_caching=True)
    for seq in (a, w, u, v):
        sched.add(seq)
    assert _step(sched) == [(a, 13), (u, 8)] and list(sched.waiting) == [w, v]
    sched.finish(u, "stop")
    assert _step(sched) == [(a, 1), (w, 2)] and list(sched.waiting) == [v]
    small = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_queue=8, pool=BlockPool(6, 4),
                      prefix_caching=True)
    big = Sequence("big", list(range(500, 516)), GREEDY)  # 4 blocks: 2 are left beside a's 4
    a2, w2 = Sequence("a", shared + [50], GREEDY), Sequence("w", shared + [60, 61], GREEDY)
    for seq in (a2, w2, big):
        small.add(seq)
    assert _step(small) == [(a2, 13)] and list(small.waiting) == [w2, big] and small.pool.blocks(big) == ()


def test_same_prefix_prompts_in_one_step_prefill_it_once(mixtral):
    """Three copies of a prompt and another one in one call (as OpenAI's n = 3 queues them), a budget they all fit
    in: the copies wait for the first one's prefill (a step) and run only what its cached blocks do not hold, while
    the other one, sharing none of it, runs beside the first from the first step; the same tokens and logprobs as
    without prefix caching (where each runs it whole)."""
    path, kw = mixtral, dict(kv_block_size=4, max_model_len=64)
    other = torch.randint(3, 400, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    prompts = [PROMPTS[0]] * 3 + [other]
    off, ran_off = run(LLM(str(path), prefix_caching=False, **kw), prompts, together=True)
    assert [ran_off[o.request_id] for o in off] == [len(p) + 5 for p in prompts]
    llm = LLM(str(path), **kw)
    on, ran, steps = counted(llm.engine.scheduler, lambda: llm.generate(prompts, GREEDY))
    same(on, off)
    assert [ran[o.request_id] for o in on] == [32 + 5, 32 - 28 + 5, 32 - 28 + 5, 20 + 5]
    ids = [o.request_id for o in on]
    assert steps[0] == [(ids[0], 32), (ids[3], 20)]
    assert steps[1] == [(ids[0], 1), (ids[3], 1), (ids[1], 4), (ids[2], 4)]
