"""Preemption by recompute in the engine: a cache too small for its running sequences gives the tokens, seeded
samples and logprobs of one big enough (prefix caching on and off, a Gated DeltaNet family too), no token sent
twice; chats stopping early run many at once where whole reservations let two."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    return {"mixtral": make_tiny_model("mixtral", root / "mixtral", layers=2, experts=4),
            "qwen3_next": make_family_checkpoint("qwen3_next", root / "qwen3_next", case=MORE_CASES.get("qwen3_next"))}


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SHARED = _ids(8, 99)  # two whole blocks of 4 the prompts start with (prefix caching's hits)
PROMPTS = [SHARED + _ids(n, n) for n in (1, 2, 3, 4, 5, 6)]  # 9 to 14 tokens: 3 or 4 blocks each
PARAMS = [SamplingParams(max_tokens=20, temperature=1.0 if i % 2 else 0.0, seed=i, ignore_eos=True, logprobs=2)
          for i in range(len(PROMPTS))]  # greedy and seeded sampling, alternately


def _run(llm: LLM, kv_cache_tokens: int | None, caching: bool) -> tuple[list, Engine]:
    """(sequences, engine) of PROMPTS run together; checks no step reports a sequence without one new token."""
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=64, tokenizer=llm.tokenizer, max_num_seqs=6,
                    kv_cache_tokens=kv_cache_tokens, kv_block_size=4, max_num_batched_tokens=24,
                    prefix_caching=caching)
    seqs = [engine.add_request(f"r{i}", p, s) for i, (p, s) in enumerate(zip(PROMPTS, PARAMS))]
    told = {s: 0 for s in seqs}
    while engine.has_work():
        for s in engine.step():  # a recompute's chunks report nothing; its draw, the next token only
            assert len(s.output_ids) == told[s] + 1 and s.error is None, (s.request_id, told[s], s.output_ids)
            told[s] += 1
    return seqs, engine


@pytest.mark.parametrize("family, caching", [("mixtral", True), ("mixtral", False), ("qwen3_next", False)])
def test_preempted_sequences_get_the_tokens_of_a_cache_big_enough(checkpoints, family, caching):
    """40 positions (10 blocks) for six sequences of up to 34 tokens: the newest are preempted, several times, and
    recomputed (in chunks of a 24-token budget) over their prompts and drawn tokens: greedy and seeded tokens, the
    texts, and logprobs (within float32 rounding: other chunk shapes) are those of a cache that preempts none;
    every block and slot is free at the end."""
    llm = LLM(str(checkpoints[family]), max_model_len=64)
    want, big = _run(llm, None, caching)
    got, small = _run(llm, 40, caching)
    assert big.scheduler.preemptions == 0 and small.scheduler.preemptions >= 3
    assert sum(s.preempted for s in got) == small.scheduler.preemptions
    assert [s.output_ids for s in got] == [s.output_ids for s in want]
    assert [s.text for s in got] == [s.text for s in want] and all(s.finish_reason == "length" for s in got)
    for g, w in zip(got, want):
        assert [lp.token_id for lp in g.logprobs] == g.output_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs, w.logprobs)) < 1e-4
        assert [[t for t, _ in lp.top] for lp in g.logprobs] == [[t for t, _ in lp.top] for lp in w.logprobs]
    pool = small.scheduler.pool
    assert pool.num_free == pool.num_blocks and sorted(small.scheduler.free_slots) == list(range(6))
    assert small.prefix_caching == (caching and family == "mixtral")
    if small.prefix_caching:
        assert pool.num_cached > 0 and pool.queried_tokens == sum(map(len, PROMPTS))  # first admissions only


def test_chats_without_max_tokens_that_stop_early_run_together(checkpoints):
    """kv_cache_tokens = 2 x max_model_len and 8 chats with max_tokens the context's rest (OpenAI's default), each
    stopping at its 8th greedy token (its stop_token_ids, found by a run of 8 tokens): whole reservations (prompt +
    max_tokens) ran two at a time; blocks on demand run more than two in a step, and the same tokens."""
    llm = LLM(str(checkpoints["mixtral"]), max_model_len=64, max_num_seqs=8, kv_block_size=8)
    prompts = [_ids(10, 50 + i) for i in range(8)]
    probe = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=64, tokenizer=llm.tokenizer, max_num_seqs=8,
                    kv_cache_tokens=2 * 64, kv_block_size=8)
    seqs = [engine.add_request(f"c{i}", p, SamplingParams(max_tokens=64 - len(p), temperature=0.0, ignore_eos=True,
                                                          stop_token_ids=[o.token_ids[-1]]))
            for i, (p, o) in enumerate(zip(prompts, probe))]
    most = 0
    while engine.has_work():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    assert most > 2, most
    for s, o in zip(seqs, probe):
        end = o.token_ids.index(o.token_ids[-1]) + 1  # the stop token's first time
        assert (s.output_ids, s.finish_reason) == (o.token_ids[:end], "stop")
    assert engine.scheduler.pool.num_free == 16
