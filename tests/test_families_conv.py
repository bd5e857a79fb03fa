"""Short-convolution layers, LFM2-MoE: the conv window per slot across chunked prefill, batched decodes, reused
slots and repeated steps, against transformers alone; memory, and the strict loader."""

from __future__ import annotations

import pytest
import torch

from elasticmoe import LLM
from tests.slot_state_cases import (assert_abort_zeroes, assert_batched_like_transformers, assert_prompt_in_chunks,
                                    assert_slot_reused_from_zero, family_fixtures, variant_like_transformers)
from tests.test_families import _add_tensors, _copy, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import LFM2, MORE_CASES

# conv biases, a 4-tap conv (a window of 3: wider than the 2-token chunks below), tied embeddings, no expert bias,
# un-normalised top-k
BIASED = ("Lfm2MoeConfig", dict(LFM2, conv_bias=True, conv_L_cache=4, use_expert_bias=False, norm_topk_prob=False,
                                tie_word_embeddings=True), "")


ckpt, ref = family_fixtures("lfm2_moe", MORE_CASES["lfm2_moe"])


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
    assert_prompt_in_chunks(request.getfixturevalue(which), 60)


def test_biased_variant_batches_match_transformers_alone(biased):
    llm = variant_like_transformers(biased, [33, 1, 2, 9], seed=5, max_num_seqs=3, budget=7)
    assert llm.engine.spec.tie_word_embeddings and llm.engine.spec.linear.bias


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes batched, two slots reused (their window from zero again)."""
    assert_batched_like_transformers(ckpt, ref, [150, 1, 37, 2, 5, 64], seed=1, max_num_seqs=4, budget=24)


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    assert_slot_reused_from_zero(ckpt, ref)


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
    assert_abort_zeroes(ckpt, layer=0)


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
