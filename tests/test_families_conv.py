"""Short-convolution layers, LFM2-MoE: the conv window per slot across chunked prefill, batched decodes, reused
slots and repeated steps, against transformers alone; memory, and the strict loader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_linear import (GREEDY, _assert_transformers_alone, _prompts, _run, assert_config_refused,
                                        assert_retried_steps_exact)
from tests.test_families_more import LFM2, MORE_CASES

# conv biases, a 4-tap conv (a window of 3: wider than the 2-token chunks below), tied embeddings, no expert bias,
# un-normalised top-k
BIASED = ("Lfm2MoeConfig", dict(LFM2, conv_bias=True, conv_L_cache=4, use_expert_bias=False, norm_topk_prob=False,
                                tie_word_embeddings=True), "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_family_checkpoint("lfm2_moe", tmp_path_factory.mktemp("conv") / "l", case=MORE_CASES["lfm2_moe"])


@pytest.fixture(scope="module")
def ref(ckpt):
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    return make_family_checkpoint("lfm2_moe", tmp_path_factory.mktemp("conv_b") / "l", case=BIASED)


def test_both_layer_kinds_are_built(ckpt):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.short_conv import ShortConv

    llm = LLM(str(ckpt), dtype="float32")
    assert [type(layer.attn) for layer in llm.engine.model.layers] == [ShortConv, Attention, ShortConv]
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []
    assert all(s.rec is None for s in llm.engine.cache.linear.values())


@pytest.mark.parametrize("which", ["ckpt", "biased"])
def test_prompt_logits_match_transformers_in_one_and_in_chunks(which, request):
    """60 tokens in one prefill and in chunks of 24 and of 2 (shorter than the conv window: each chunk from the
    window the last ones left); logits of the whole prompt within 1e-4."""
    path = request.getfixturevalue(which)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = _prompts([60])[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    for budget in (2048, 24, 2):
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=budget)
        seq = llm.engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0.0))
        while llm.engine.has_work():
            llm.engine.step()
        assert seq.output_ids == [int(theirs[-1].argmax())]
    assert _rel(LLM(str(path), dtype="float32").logits(ids), theirs) < 1e-4


def test_biased_variant_batches_match_transformers_alone(biased):
    ref = AutoModelForCausalLM.from_pretrained(str(biased), dtype=torch.float32).eval()
    prompts = _prompts([33, 1, 2, 9], seed=5)
    llm = LLM(str(biased), dtype="float32", max_num_seqs=3, max_num_batched_tokens=7)
    assert llm.engine.spec.tie_word_embeddings and llm.engine.spec.linear.bias
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes batched, two slots reused (their window from zero again)."""
    prompts = _prompts([150, 1, 37, 2, 5, 64], seed=1)
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=4, max_num_batched_tokens=24)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    prompts = _prompts([40, 9, 1], seed=2)
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=1)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


@pytest.mark.parametrize("layer", [1, 2])
def test_a_repeated_step_reads_the_window_it_started_from(ckpt, ref, layer):
    """Steps failing at layer 1's or 2's experts (after conv layer 0, and for layer 2 its own conv, ran) are
    retried: the retry reads the window at the step's start, so every request gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def test_the_cache_keeps_no_kv_for_conv_layers_and_counts_their_window(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    assert KVCache.bytes_per_token(spec, torch.float32) == 1 * a.num_kv_heads * 2 * a.head_dim * 4  # 1 of 3 layers
    state = sum(s.conv.numel() * s.conv.element_size() for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32) == 3 * 2 * 2 * 4 * 64 * 2  # 2 layers, 2 copies


def test_abort_zeroes_the_slots_window(ckpt):
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=1)
    engine = llm.engine
    seq = engine.add_request("r", _prompts([20])[0], GREEDY)
    engine.step()
    engine.step()
    state = engine.cache.linear[0]
    assert state.conv[seq.slot].abs().sum() > 0 and max(state.pos[seq.slot]) == 21
    engine.abort("r")
    assert state.conv.abs().sum() == 0 and state.pos[0] == [-1, -1]


@pytest.mark.parametrize("model,tensor,shape", [
    ("ckpt", "model.layers.0.self_attn.k_proj.weight", (32, 64)),  # attention weights at a conv layer
    ("ckpt", "model.layers.0.conv.out_proj.bias", (64,)),  # conv biases without config.conv_bias
    ("biased", "model.layers.1.feed_forward.expert_bias", (8,)),  # an expert bias without use_expert_bias
])
def test_a_tensor_transformers_would_not_load_fails_the_load(request, tmp_path, model, tensor, shape):
    """transformers builds no such module (and drops the stored tensor): not run silently, the load names it."""
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(request.getfixturevalue(model), tmp_path / "x")
    _add_tensors(ck, {tensor: torch.ones(shape)})
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        open_model(str(ck))


@pytest.mark.parametrize("key,value,message", [
    ("conv_L_cache", 0, r"config\.conv_L_cache=0: want a positive integer"),
    ("layer_types", ["conv", "sliding_attention", "conv"], r"config\.layer_types=.*want 3 of conv / full_attention"),
])
def test_impossible_conv_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)
