"""Edges of the linear-attention (Gated DeltaNet) and sparse-attention (DSA) layers under the engine: prompts on and
past the delta rule's 64-token blocks, contexts reaching max_model_len, every slot reused, chunks cut to fit, an
abort mid-prefill; and what the decode path sends to the device each step."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.dispatch import ExpertsUnavailable
from tests.hf_ref import assert_greedy_alone
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES
from tests.test_step_host_copies import count_host_tensors

MAX_LEN = 140


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    return {t: make_family_checkpoint(t, root / t, case=MORE_CASES[t]) for t in ("qwen3_next", "deepseek_v32")}


@pytest.fixture(scope="module")
def refs(dirs):
    return {t: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval() for t, p in dirs.items()}


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def _run(engine, prompts: list[list[int]], tokens: int = 10) -> list:
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=min(tokens, MAX_LEN - len(p)),
                                                          temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    return [s.error or s.output_ids for s in seqs]


@pytest.mark.parametrize("budget", [64, 65])
def test_block_edges_and_full_contexts_through_two_reused_slots(dirs, refs, budget):
    """Prompts of 64, 65, 128, 63, 1, 127 and 129 tokens through 2 slots (each reused thrice), chunks ending on the
    delta rule's 64-token blocks (budget 64) or one past them (65: a 1-token remainder takes the decode path), the
    long ones generating up to max_model_len: each gets the tokens transformers gives it alone."""
    prompts = _prompts([64, 65, 128, 63, 1, 127, 129], seed=5)
    llm = LLM(str(dirs["qwen3_next"]), dtype="float32", max_num_seqs=2, max_num_batched_tokens=budget,
              max_model_len=MAX_LEN)
    got = _run(llm.engine, prompts, tokens=20)
    assert_greedy_alone(refs["qwen3_next"], prompts, got, [20, 20, 12, 20, 20, 13, 11])  # 128 + 12 = max_model_len


class _TooBig:
    """Fails layer 2's experts for more than `limit` tokens, for their size (a shard out of memory): after layers 0
    and 2 (linear in qwen3_next) wrote their new state, the engine cuts the chunk into a smaller piece."""

    def __init__(self, inner, limit: int):
        self.inner, self.limit, self.failed = inner, limit, 0

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if layer == 2 and hidden.shape[0] > self.limit:
            self.failed += 1
            error = ExpertsUnavailable(f"injected: {hidden.shape[0]} tokens do not fit")
            error.for_its_size = True
            raise error
        return self.inner.dispatch(layer, hidden, topk_ids, topk_weights)


@pytest.mark.parametrize("model_type", ["qwen3_next", "deepseek_v32"])
def test_chunks_cut_to_fit_after_the_state_was_written(dirs, refs, model_type):
    """64-token steps that fail at layer 2 for their size are halved and their prefill chunks cut to 16-token
    pieces: the pieces read the state and index keys at the chunk's start, never the failed attempt's."""
    prompts = _prompts([65, 3, 40, 128, 1, 17], seed=7)
    llm = LLM(str(dirs[model_type]), dtype="float32", max_num_seqs=3, max_num_batched_tokens=64)
    llm.engine.dispatcher = too_big = _TooBig(llm.engine.dispatcher, 20)
    assert_greedy_alone(refs[model_type], prompts, _run(llm.engine, prompts), [10] * 6)
    assert too_big.failed >= 2 and llm.engine.failed_requests == 0


@pytest.mark.parametrize("model_type", ["qwen3_next", "deepseek_v32"])
def test_a_slot_aborted_mid_prefill_serves_the_next_request_from_zero(dirs, refs, model_type):
    """A 128-token prompt aborted after two 16-token chunks; the one slot's next request (its index_topk of 8 over a
    context of 3 for DSA) gets transformers' tokens."""
    prompts = _prompts([128, 3, 65], seed=8)
    llm = LLM(str(dirs[model_type]), dtype="float32", max_num_seqs=1, max_num_batched_tokens=16)
    llm.engine.add_request("a", prompts[0], SamplingParams(max_tokens=4))
    llm.engine.step()
    llm.engine.step()
    llm.engine.abort("a")
    assert_greedy_alone(refs[model_type], prompts[1:], _run(llm.engine, prompts[1:]), [10, 10])


def test_a_decode_step_sends_the_linear_layer_one_host_tensor(dirs, monkeypatch):
    """Each torch.tensor built from host lists for a CUDA device is a copy that waits for the device's queued work
    (a host sync): a linear layer's decode of B rows builds one (rows, slots and state copies together), not five."""
    from elasticmoe.model.batch import build_batch
    from elasticmoe.model.deltanet import GatedDeltaNet

    llm = LLM(str(dirs["qwen3_next"]), dtype="float32", max_num_seqs=3)
    engine = llm.engine
    for i, p in enumerate(_prompts([5, 9, 2], seed=9)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.step()  # the prefills
    seqs = list(engine.seqs.values())
    batch = build_batch([(s.slot, s.num_cached, [s.token(s.num_cached)]) for s in seqs], engine.device,
                        engine.cache.table)
    layer = next(x.attn for x in engine.model.layers if isinstance(x.attn, GatedDeltaNet))
    x = torch.randn(len(seqs), engine.spec.hidden_size)
    made = count_host_tensors(monkeypatch)
    out = layer.forward(x, batch, engine.cache)
    monkeypatch.undo()
    assert out.shape == x.shape and made == ["frombuffer"]
    state = engine.cache.linear[layer.layer]
    assert all(s.num_cached + 1 in state.pos[s.slot] for s in seqs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_slots_linear_state_is_counted_as_allocated(dirs, dtype):
    """KVCache.bytes_per_slot is what the cache holds per slot for the linear layers: both copies of each state."""
    from elasticmoe.engine.engine import DTYPES
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(dirs["qwen3_next"]), dtype=dtype, max_num_seqs=3, max_model_len=64)
    cache, spec = llm.engine.cache, llm.engine.spec
    held = sum(s.conv.numel() * s.conv.element_size() + s.rec.numel() * s.rec.element_size()
               for s in cache.linear.values())
    assert held == 3 * KVCache.bytes_per_slot(spec, DTYPES[dtype])
    assert held == 3 * sum(s.nbytes_per_slot() for s in cache.linear.values())
