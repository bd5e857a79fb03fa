"""Checks every per-slot-state family's tests share (Gated DeltaNet, short convs, Mamba, Mamba2, lightning, KDA):
module fixtures of its checkpoint and transformers' twin, batches through slots, a reused slot, an abort."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from tests.hf_ref import assert_greedy_alone
from tests.test_families import _rel, make_family_checkpoint

TOKENS = 8
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
LENGTHS = [150, 1, 37, 70, 5, 64]  # past the delta rule's 64-token blocks, one token, a block exactly


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def _assert_transformers_alone(ref, prompts: list[list[int]], got: list) -> None:
    """Each request got transformers' TOKENS greedy tokens for its prompt alone (one forward by its chunked delta
    rule)."""
    assert_greedy_alone(ref, prompts, got, [TOKENS] * len(prompts))


def _run(engine, prompts: list[list[int]]) -> list:
    seqs = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    return [s.error or s.output_ids for s in seqs]


def family_fixtures(model_type: str, case: tuple) -> tuple:
    """The module-scoped fixtures `ckpt` (the family's checkpoint for `case`, written by transformers) and `ref`
    (transformers' float32 model of it); a test file binds both at module level, where pytest finds them."""

    @pytest.fixture(scope="module", name="ckpt")
    def checkpoint(tmp_path_factory):
        return make_family_checkpoint(model_type, tmp_path_factory.mktemp(model_type) / "m", case=case)

    @pytest.fixture(scope="module", name="ref")
    def reference(ckpt):
        return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()

    return checkpoint, reference


def assert_batched_like_transformers(ckpt, ref, lengths: list[int], seed: int, max_num_seqs: int,
                                     budget: int = 2048) -> None:
    """Requests of `lengths` through max_num_seqs slots at `budget` tokens a step (prefills cut in chunks beside
    other requests' decodes, decodes batched, slots reused): each gets the greedy tokens transformers gives it alone."""
    prompts = _prompts(lengths, seed=seed)
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


def assert_slot_reused_from_zero(ckpt, ref) -> None:
    """One slot: a request finishes (its state stays in the slot), the next starts at position 0 from zeros, a
    1-token prompt (the decode path) too."""
    assert_batched_like_transformers(ckpt, ref, [40, 9, 1], seed=2, max_num_seqs=1)


def assert_abort_zeroes(ckpt, layer: int) -> None:
    """A request aborted after two steps: its slot's state at `layer` (the conv window and the recurrent state,
    each where the layer keeps one, both written by then) is zeroed and holds no position."""
    engine = LLM(str(ckpt), dtype="float32", max_num_seqs=1).engine
    seq = engine.add_request("r", _prompts([20])[0], GREEDY)
    engine.step()
    engine.step()
    state = engine.cache.linear[layer]
    parts = [t for t in (state.conv, state.rec) if t is not None and t[0].numel()]
    assert parts and all(t[seq.slot].abs().sum() > 0 for t in parts) and max(state.pos[seq.slot]) == 21
    engine.abort("r")
    assert all(t.abs().sum() == 0 for t in parts) and state.pos[0] == [-1, -1]


def assert_prompt_in_chunks(path, length: int, budgets: tuple[int, ...] = (2048, 24, 2)) -> None:
    """A `length`-token prompt prefilled in one and in chunks of each budget (each chunk from the state the last ones
    left): the same greedy token as transformers, and the whole prompt's logits within 1e-4 of its."""
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = _prompts([length])[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]  # [L, V]
    for budget in budgets:
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=budget)
        seq = llm.engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0.0))
        while llm.engine.has_work():
            llm.engine.step()
        assert seq.output_ids == [int(theirs[-1].argmax())]
    assert _rel(LLM(str(path), dtype="float32").logits(ids), theirs) < 1e-4


def variant_like_transformers(path, lengths: list[int], seed: int, max_num_seqs: int, budget: int) -> LLM:
    """A variant checkpoint's requests batched as in assert_batched_like_transformers, against its own transformers
    model; returns the LLM (its spec for the caller's checks)."""
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = _prompts(lengths, seed=seed)
    llm = LLM(str(path), dtype="float32", max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))
    return llm


def assert_used_slot_one_token_from_zero(ckpt, ref) -> None:
    """A finished request leaves its window and state in the slot; a 1-token forward there (the decode path, a chunk
    at 0) reads zeros: its logits are transformers' for that token alone, within 1e-4."""
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=1)
    _run(llm.engine, _prompts([30], seed=6))
    assert all(s.rec.abs().sum() > 0 and s.conv.abs().sum() > 0 for s in llm.engine.cache.linear.values())
    with torch.no_grad():
        assert _rel(llm.logits([77]), ref(torch.tensor([[77]])).logits[0]) < 1e-4
