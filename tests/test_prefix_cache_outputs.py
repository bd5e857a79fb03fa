"""Prefix caching of the blocks a sequence generated: its full blocks of prompt and outputs whose K/V it wrote are
cached (vLLM's), so a chat's next turn (prompt, answer and more) finds the answer's blocks, and a preempted sequence
its own (prompt and outputs) rather than recompute them; the tokens of an engine without caching (and
transformers')."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from tests.prefix_util import GREEDY, PROMPTS, assert_transformers_alone, counted, same
from tests.test_families import make_family_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_outputs")
    return {"mixtral": make_tiny_model("mixtral", root / "mixtral", layers=2, experts=4),
            "deepseek_v2": make_family_checkpoint("deepseek_v2", root / "deepseek_v2"),
            "gpt_oss": make_family_checkpoint("gpt_oss", root / "gpt_oss")}


MORE = torch.randint(3, 400, (7,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.mark.parametrize("family, bs", [("mixtral", 4), ("deepseek_v2", 5), ("gpt_oss", 4)])
def test_a_chats_next_turn_finds_the_answers_blocks_cached(checkpoints, family, bs):
    """A plain, an MLA and a sliding-window family (gpt-oss: a window of 8, sinks): turn 1 is a 32-token prompt and
    its 6 tokens drawn; turn 2 that prompt, the answer and 7 tokens more. Turn 2's cached_tokens cover the blocks of
    turn 1's written positions, the answer's among them (all but the last token drawn: (32 + 5) // bs blocks, where
    its prompt's alone were 32 // bs), and it runs only the rest; both turns get the tokens and logprobs of an
    engine without prefix caching, and transformers' tokens."""
    path, kw = checkpoints[family], dict(kv_block_size=bs, max_num_batched_tokens=16, max_model_len=64)
    first = PROMPTS[0]
    off = LLM(str(path), prefix_caching=False, **kw)
    (one_off,) = off.generate([first], GREEDY)
    second = first + one_off.token_ids + MORE  # 45 tokens
    (two_off,) = off.generate([second], GREEDY)
    assert_transformers_alone(path, [first, second], [one_off, two_off])
    llm = LLM(str(path), **kw)
    (one,) = llm.generate([first], GREEDY)
    pool = llm.engine.scheduler.pool
    assert pool.num_cached == (len(first) + 5) // bs and one.num_cached_tokens == 0
    (two,), ran, _ = counted(llm.engine.scheduler, lambda: llm.generate([second], GREEDY))
    hit = (len(first) + 5) // bs * bs
    assert two.num_cached_tokens == hit > len(first) // bs * bs and pool.hit_tokens == hit
    assert ran[two.request_id] == len(second) - hit + 5
    same([one, two], [one_off, two_off])


def test_a_preempted_sequence_finds_its_own_blocks_prompt_and_outputs(checkpoints):
    """A cache of 10 blocks of 4, prompts of 9-12 tokens: when r1's 13th token finds no block free, r2 (the newest,
    11 + 3 tokens, 13 positions written) is preempted; once r0 ends it is admitted again and finds its 3 written
    blocks cached (the third of prompt and output tokens; its prompt's alone were 2), running 2 tokens rather than
    6 (14 without caching). Its usage's cached_tokens and the pool's lookups count first admissions only. The
    tokens and logprobs of an engine without prefix caching, and of each prompt alone."""
    llm = LLM(str(checkpoints["mixtral"]))
    prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (9, 10, 11, 12)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (4, 8, 8, 8)]
    outs = {}
    for caching in (True, False):
        engine = Engine(llm.files, LocalDispatcher(llm.store), max_model_len=64, tokenizer=llm.tokenizer,
                        max_num_seqs=4, kv_cache_tokens=40, kv_block_size=4, prefix_caching=caching)
        pool = engine.scheduler.pool
        seqs = [engine.add_request(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))]
        hits = []  # r2's cached blocks at its admissions

        def drain():
            while engine.has_work():
                engine.step()
                if seqs[2] in engine.scheduler.running and len(hits) == seqs[2].preempted:
                    hits.append(pool.hits(seqs[2]))
        _, _, steps = counted(engine.scheduler, drain)
        assert [s.preempted for s in seqs] == [0, 0, 1, 0] and hits == ([0, 3] if caching else [0, 0])
        assert [n for step in steps for rid, n in step if rid == "r2" and n > 1] == [11, 2 if caching else 14]
        assert [s.cached_tokens for s in seqs] == [0] * 4 and pool.queried_tokens == (42 if caching else 0)
        assert pool.hit_tokens == 0 and pool.num_free == 10 and [s.error for s in seqs] == [None] * 4
        outs[caching] = seqs
    on, off = outs[True], outs[False]
    assert [s.output_ids for s in on] == [s.output_ids for s in off]
    assert max(abs(p.logprob - q.logprob) for x, y in zip(on, off) for p, q in zip(x.logprobs, y.logprobs)) < 1e-4
    assert [s.output_ids for s in outs[True]] == [llm.generate([p], s)[0].token_ids for p, s in zip(prompts, params)]
