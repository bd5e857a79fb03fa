"""The sampler at its settings' edges against straightforward references: near-greedy settings, top_k past the
vocabulary, the filters' kept sets (vLLM's order: temperature, min_p, top_k, top_p) in float64, logprobs as the raw
logits' log_softmax, a seeded row's draws whatever shares its batch, and the penalties kept across steps against
transformers' repetition penalty and OpenAI's frequency / presence formula."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from elasticmoe.engine.sampling import PenaltyState, RowContext, SamplingParams, _filter, process_logits, sample

V = 64


def _logits(rows: int = 6, seed: int = 0) -> torch.Tensor:
    """[rows, V] float32 without near-ties at the top (each row's best leads by more than 0.05)."""
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1] > 0.05).all()
    return logits


def _gens(seed: int | None, rows: int) -> list:
    return [None if seed is None else torch.Generator().manual_seed(seed + i) for i in range(rows)]


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=9.9e-6), dict(temperature=1e-5),
                                dict(top_k=1), dict(top_p=1e-9), dict(min_p=1.0), dict(top_k=1, temperature=50.0)],
                         ids=str)
def test_near_greedy_settings_pick_the_argmax(kw):
    """Below 1e-5 is greedy; 1e-5 itself samples from logits / 1e-5, top_k 1, a tiny top_p and min_p 1 keep the top
    token alone: each is the argmax (no ties here), whatever the seed."""
    logits = _logits()
    for seed in (None, 3):
        tokens, _, errors = sample(logits, [SamplingParams(**kw)] * 6, _gens(seed, 6))
        assert tokens == logits.argmax(-1).tolist() and errors == [None] * 6


@pytest.mark.parametrize("top_k", [V, V + 1, 2**31 - 1])
def test_top_k_at_or_past_the_vocabulary_is_off(top_k):
    logits = _logits(1)[0]
    assert torch.equal(_filter(logits, top_k, 1.0), logits)
    rows = _logits(4)
    off = sample(rows, [SamplingParams(top_k=0)] * 4, _gens(5, 4))[0]
    assert sample(rows, [SamplingParams(top_k=top_k)] * 4, _gens(5, 4))[0] == off


def _kept_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The tokens vLLM's definitions keep, in float64: min_p on the tempered distribution, then top_k (ties at the
    k-th kept), then the smallest most-likely prefix of what is left whose mass reaches top_p."""
    x = logits.double() / temperature
    keep = torch.ones(V, dtype=torch.bool)
    if min_p > 0:
        p = x.softmax(-1)
        keep &= p >= min_p * p.max()
    if 0 < top_k < V:
        keep &= x >= x[keep].topk(min(top_k, int(keep.sum()))).values[-1]
    if top_p < 1:
        p = x.masked_fill(~keep, -math.inf).softmax(-1)
        order = p.argsort(descending=True)
        before = p[order].cumsum(0) - p[order]  # mass of the more likely tokens
        keep[order[1:][before[1:] >= top_p]] = False
    return set(keep.nonzero().flatten().tolist())


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 10, 0.9, 0.05),
    (2.0, 3, 0.5, 0.3), (1.0, V - 1, 0.999, 0.0)])
def test_filters_keep_what_the_definitions_keep(temperature, top_k, top_p, min_p):
    for row in _logits(6, seed=1):
        got = _filter(row / temperature, top_k, top_p, min_p)
        assert set(got.isfinite().nonzero().flatten().tolist()) == _kept_reference(row, temperature, top_k, top_p,
                                                                                    min_p)


def test_logprobs_are_the_raw_logits_log_softmax():
    """Whatever temperature, filters or penalties chose the token, its logprob and the top n are the model's own
    distribution's (as vLLM's default), n past the vocabulary gives V alternatives, and n = 0 none."""
    logits = _logits()
    ref = logits.double().log_softmax(-1)
    params = [SamplingParams(temperature=0.5, top_k=4, logprobs=3, seed=1), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(logprobs=V + 9, seed=2, repetition_penalty=1.5, frequency_penalty=1.0),
              SamplingParams(top_p=0.5, min_p=0.1, logprobs=1, seed=3), SamplingParams(), SamplingParams(logprobs=2)]
    contexts = [RowContext([1, 2], [3, 3])] * 6
    tokens, lps, errors = sample(logits, params, _gens(1, 6), contexts)
    assert errors == [None] * 6 and lps[4] is None
    for i in (0, 1, 2, 3, 5):
        lp = lps[i]
        assert lp.token_id == tokens[i] and abs(lp.logprob - ref[i, tokens[i]].item()) < 1e-5
        n = min(params[i].logprobs, V)
        assert [t for t, _ in lp.top] == (ref[i].topk(n).indices.tolist() if n else [])
        assert max((abs(v - ref[i, t].item()) for t, v in lp.top), default=0.0) < 1e-5


def test_a_seeded_row_draws_alike_alone_or_beside_others():
    """A seeded row's token, step after step, is the same alone as beside greedy rows, rows of other seeds,
    unseeded rows and a row whose logits are NaN (which fails alone, consuming none of the others' draws)."""
    logits = _logits(5, seed=2)
    logits[3] = float("nan")
    mine = SamplingParams(temperature=1.3, top_p=0.95, seed=7)
    others = [SamplingParams(temperature=0), SamplingParams(seed=8), SamplingParams(), SamplingParams(seed=9)]
    alone_gen, batch_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for step in range(6):
        row = logits[step % 3 : step % 3 + 1] * (1 + step / 10)  # [1, V]
        alone = sample(row, [mine], [alone_gen])[0]
        batch = torch.cat([logits[:2], row, logits[3:]])  # [5, V], mine at 2
        tokens, _, errors = sample(batch, others[:2] + [mine] + others[2:], [None, _gens(8, 1)[0], batch_gen,
                                                                              None, _gens(9, 1)[0]])
        assert tokens[2] == alone[0] and errors[3] is not None and tokens[3] is None, step


def test_penalties_across_steps_match_their_definitions():
    """PenaltyState, updated step by step, gives what transformers' repetition penalty (prompt and output) and
    OpenAI's frequency / presence penalties (output only) give from scratch."""
    logits = _logits(1)[0]
    prompt, output = [1, 2, 3, 3, 60], [60, 8, 8, 9, 2, 8, 63]
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=-0.4)
    state = PenaltyState()
    for step in range(len(output) + 1):
        out = output[:step]
        got = process_logits(logits, p, RowContext(prompt, out, (), state))
        ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + out]), logits[None].clone())[0]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float()
        ref = ref - 0.7 * counts + 0.4 * (counts > 0).float()
        assert torch.allclose(got, ref, rtol=0, atol=1e-6), step
