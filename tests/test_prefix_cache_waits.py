"""In-batch prefix caching: a prompt whose first blocks a sequence admitted before it is still prefilling waits for
them to be cached rather than compute them a second time beside it (SGLang's); the same tokens as without caching."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM
from elasticmoe.engine.kv_blocks import BlockPool
from elasticmoe.engine.scheduler import Scheduler, Sequence, Status
from elasticmoe.model.tiny import make_tiny_model
from tests.prefix_util import GREEDY, PROMPTS, run, same


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("prefix_waits") / "mixtral", layers=2, experts=4)


@pytest.mark.parametrize("caching", [True, False])
def test_a_prompt_whose_prefix_is_being_prefilled_waits_for_its_blocks(caching):
    """Blocks of 4: b's 14 tokens start with a's first 12, which a (admitted in the same step) is prefilling and has
    not cached: b waits a step (in arrival order; those after it too) and then finds them cached, running 2 tokens
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


def test_same_prefix_prompts_in_one_step_prefill_it_once(mixtral):
    """Three copies of a prompt and another one in one call (as OpenAI's n = 3 queues them), a budget they all fit
    in: the copies wait for the first one's prefill (a step) and run only what its cached blocks do not hold; the
    same tokens and logprobs as without prefix caching (where each runs it whole)."""
    path, kw = mixtral, dict(kv_block_size=4, max_model_len=64)
    other = torch.randint(3, 400, (20,), generator=torch.Generator().manual_seed(9)).tolist()
    prompts = [PROMPTS[0]] * 3 + [other]
    off, ran_off = run(LLM(str(path), prefix_caching=False, **kw), prompts, together=True)
    assert [ran_off[o.request_id] for o in off] == [len(p) + 5 for p in prompts]
    on, ran = run(LLM(str(path), **kw), prompts, together=True)
    same(on, off)
    assert [ran[o.request_id] for o in on] == [32 + 5, 32 - 28 + 5, 32 - 28 + 5, 20 + 5]
