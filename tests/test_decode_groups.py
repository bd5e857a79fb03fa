"""Decode rows attended in groups of similar context lengths (model/batch.py): bounded reads, tokens as alone."""

from __future__ import annotations

import random

import pytest

import elasticmoe.model.batch as batch_mod
from elasticmoe import LLM, SamplingParams
from elasticmoe.model.attention import Attention
from tests.test_families import FAMILY_CASES, make_family_checkpoint
from tests.test_families_more import MORE_CASES

LONG = 1100  # tokens: past DECODE_GROUP_MIN and over twice every short context
FLOOR = 512  # DECODE_GROUP_MIN: contexts up to this long share a group
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture
def reads(monkeypatch):
    """(layer, rows, positions each row reads) of every decode attention read (a decode group's read index [B, L],
    not a prefill chunk's: DecodeGroup.read, not StepBatch.prefill_reads)."""
    seen: list[tuple[int, int, int]] = []
    batch = [None]  # the batch the attention layer runs

    def forward(self, x, b, *args, _real=Attention.forward, **kwargs):
        batch[0] = b
        return _real(self, x, b, *args, **kwargs)
    monkeypatch.setattr(Attention, "forward", forward)
    for name in ("_gqa_gather", "_mla_latents"):  # MLA: the latents read (expanded or absorbed)
        def read(self, cache, index, _real=getattr(Attention, name)):
            if any(index is g.read for g in batch[0].decode_groups):
                seen.append((self.layer, *index.shape))
            return _real(self, cache, index)
        monkeypatch.setattr(Attention, name, read)
    return seen


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_short_decodes_beside_a_long_context_read_their_own_contexts(family, tiny_models, reads):
    """15 short requests and one of 1,100 tokens decoding together: every decode row read the cache up to the
    step's longest context (16 x 1,101 positions a layer, and with MLA as many kv_b expansions), so one long
    conversation made each short one's tokens several times dearer (CPU, wider tiny models: 3x with GQA, 27x
    with MLA). Now a row reads at most max(DECODE_GROUP_MIN, twice its own context); tokens as alone."""
    llm = LLM(str(tiny_models[family]), max_num_seqs=16)
    prompts = _prompts(llm.engine.spec.vocab_size, [3 + i for i in range(15)] + [LONG])
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    engine = llm.engine
    seqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    engine.step()  # every prefill: the step budget (2048) takes them all
    steps = 0
    while engine.has_work():
        lens = [s.num_tokens for s in engine.scheduler.running]  # each decode's context, its new token included
        reads.clear()
        engine.step()
        got = sum(rows * length for layer, rows, length in reads if layer == 0)
        bound = sum(max(FLOOR, 2 * n) for n in lens)
        assert len(lens) == 16 and got <= bound, (steps, got, bound)
        steps += 1
    assert steps == GREEDY.max_tokens - 1
    assert [s.output_ids for s in seqs] == alone and batch_mod.DECODE_GROUP_MIN == FLOOR


def _checkpoint(name: str, tiny_models, tmp_path):
    if name in tiny_models:
        return tiny_models[name]
    return make_family_checkpoint(name, tmp_path / name, case={**FAMILY_CASES, **MORE_CASES}[name])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_requests_in_different_decode_groups_get_their_solo_tokens(family, tiny_models, tmp_path, monkeypatch,
                                                                    reads):
    """With a group ending where a context is over twice its shortest (DECODE_GROUP_MIN 1), requests of 1 to 70
    tokens joining at different steps, prefilled in chunks, decode in up to 4 groups a step (each with its own masks:
    sliding windows of 8 and sinks for GPT-OSS, chunks of 8 for Llama 4) and get the tokens they get alone."""
    monkeypatch.setattr(batch_mod, "DECODE_GROUP_MIN", 1)
    path = _checkpoint(family, tiny_models, tmp_path)
    # no prefix caching: each prompt runs alone first, and cached blocks would skip the chunked prefills whose
    # staggered ends make the 4 groups
    llm = LLM(str(path), max_num_seqs=6, max_num_batched_tokens=24, prefix_caching=False)
    prompts = _prompts(llm.engine.spec.vocab_size, [1, 70, 3, 33, 7, 12, 50, 20], seed=1)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    engine, seqs, groups = llm.engine, [], 0
    while len(seqs) < len(prompts) or engine.has_work():
        if len(seqs) < len(prompts):
            seqs.append(engine.add_request(f"r{len(seqs)}", prompts[len(seqs)], params))
        reads.clear()
        engine.step()
        groups = max(groups, sum(layer == 0 for layer, _, _ in reads))
    assert groups == 4, "the decodes of a step were split by their context lengths"
    assert [s.output_ids for s in seqs] == alone
