"""Mamba (v1) layers, Jamba: the conv window and selective-scan state per slot across chunked prefill, batched
decodes, reused slots and repeated steps, against transformers alone; the scan itself, memory, and the strict
loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticmoe import LLM
from tests.slot_state_cases import (LENGTHS, assert_abort_zeroes, assert_batched_like_transformers,
                                    assert_prompt_in_chunks, assert_slot_reused_from_zero,
                                    assert_used_slot_one_token_from_zero, family_fixtures, variant_like_transformers)
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import JAMBA, MORE_CASES

# layers 0, 1 Mamba and 2 attention, every layer MoE; a 3-tap conv without bias (a window of 2, as wide as the
# 2-token chunks), in_proj / out_proj biases, expand 1, an 8-wide state, dt rank 6, tied embeddings
VARIANT = ("JambaConfig", dict(JAMBA, attn_layer_offset=2, expert_layer_period=1, expert_layer_offset=0,
                               mamba_d_conv=3, mamba_conv_bias=False, mamba_proj_bias=True, mamba_expand=1,
                               mamba_d_state=8, mamba_dt_rank=6, tie_word_embeddings=True), "")


ckpt, ref = family_fixtures("jamba", MORE_CASES["jamba"])


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    return make_family_checkpoint("jamba", tmp_path_factory.mktemp("mamba1_v") / "j", case=VARIANT)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """transformers' in-memory names: the experts packed (feed_forward.experts.gate_up_proj / down_proj)."""
    return make_family_checkpoint("jamba", tmp_path_factory.mktemp("mamba1_p") / "j", case=MORE_CASES["jamba"],
                                  packed=True)


def test_layer_kinds_and_moe_layers(ckpt, variant):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.mamba1 import Mamba1

    llm = LLM(str(ckpt), dtype="float32")
    assert [type(layer.attn) for layer in llm.engine.model.layers] == [Mamba1, Attention, Mamba1]
    assert [layer.sparse for layer in llm.engine.model.layers] == [True, False, True]
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []
    assert llm.engine.cache.linear[0].rec.shape[1:] == (2, 128, 16)  # two copies of [inner, d_state]
    assert llm.engine.spec.attention.rope_layers == (False,) * 3 and not llm.engine.spec.moe.norm_topk_prob
    other = LLM(str(variant), dtype="float32").engine
    assert [type(layer.attn) for layer in other.model.layers] == [Mamba1, Mamba1, Attention]
    assert [layer.sparse for layer in other.model.layers] == [True] * 3 and other.spec.linear.dt_rank == 6


def test_block_scan_is_the_step_recurrence():
    """The prefill scan (blocks of 64 and a shorter rest, from a given state) against scan_step token by token."""
    from elasticmoe.model.mamba1 import scan, scan_step

    g = torch.Generator().manual_seed(0)
    inner, n, length = 12, 8, 150
    x, dt = torch.randn(length, inner, generator=g), torch.randn(length, inner, generator=g).exp()
    b, c = torch.randn(length, n, generator=g), torch.randn(length, n, generator=g)
    a, s0 = -torch.rand(inner, n, generator=g) * 4, torch.randn(inner, n, generator=g)
    y, s = scan(x, dt, a, b, c, s0)
    want, state = [], s0[None]
    for t in range(length):
        out, state = scan_step(x[t][None], dt[t][None], a, b[t][None], c[t][None], state)
        want.append(out[0])
    assert _rel(y, torch.stack(want)) < 1e-5 and _rel(s, state[0]) < 1e-5


@pytest.mark.parametrize("which", ["ckpt", "variant", "packed"])
def test_prompt_logits_match_transformers_in_one_and_in_chunks(which, request):
    """150 tokens (past the scan's 64-token blocks) in one prefill and in chunks of 24 and of 2 (no wider than the
    conv window: each chunk from the window and state the last ones left); logits of the whole prompt within 1e-4."""
    assert_prompt_in_chunks(request.getfixturevalue(which), 150)


def test_variant_batches_match_transformers_alone(variant):
    llm = variant_like_transformers(variant, [33, 1, 2, 9], seed=5, max_num_seqs=3, budget=7)
    assert llm.engine.spec.tie_word_embeddings and llm.engine.spec.linear.proj_bias


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes batched, two slots reused (their window and state from zero again)."""
    assert_batched_like_transformers(ckpt, ref, LENGTHS, seed=1, max_num_seqs=4, budget=24)


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    assert_slot_reused_from_zero(ckpt, ref)


def test_a_one_token_prompt_in_a_used_slot_starts_from_zero(ckpt, ref):
    assert_used_slot_one_token_from_zero(ckpt, ref)


@pytest.mark.parametrize("layer", [0, 2])
def test_a_repeated_step_reads_the_state_it_started_from(ckpt, ref, layer):
    """Steps failing at layer 0's or 2's experts (each after its own Mamba mixer ran) are retried: the retry reads
    the window and state at the step's start, so every request gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def test_the_cache_keeps_no_kv_for_mamba_layers_and_counts_their_state(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    assert KVCache.bytes_per_token(spec, torch.float32) == 1 * a.num_kv_heads * 2 * a.head_dim * 4  # 1 of 3 layers
    state = sum(s.conv.numel() * s.conv.element_size() + s.rec.numel() * s.rec.element_size()
                for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32)
    assert KVCache.bytes_per_slot(spec, torch.float32) == 2 * 2 * 4 * (128 * 3 + 128 * 16)  # 2 layers, copies


def test_abort_zeroes_the_slots_state(ckpt):
    assert_abort_zeroes(ckpt, layer=0)


@pytest.mark.parametrize("tensor,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (32, 64)),  # attention weights at a Mamba layer
    ("model.layers.2.mamba.in_proj.bias", (256,)),  # a projection bias without mamba_proj_bias
    ("model.layers.1.mamba.D", (128,)),  # Mamba weights at an attention layer
    ("model.layers.1.feed_forward.router.weight", (8, 64)),  # a router on a dense layer
])
def test_a_tensor_transformers_would_not_load_fails_the_load(ckpt, tmp_path, tensor, shape):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "x")
    _add_tensors(ck, {tensor: torch.ones(shape)})
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        open_model(str(ck))


@pytest.mark.parametrize("tensor", ["model.layers.0.mamba.A_log", "model.layers.2.mamba.conv1d.bias",
                                    "model.layers.0.mamba.dt_layernorm.weight", "model.layers.2.mamba.dt_proj.bias"])
def test_a_missing_mamba_tensor_fails_naming_it(ckpt, tmp_path, tensor):
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "m")
    (file,) = ck.glob("*.safetensors")
    tensors = load_file(str(file))
    del tensors[tensor]
    save_file(tensors, str(file), metadata={"format": "pt"})
    layer, suffix = tensor.split(".", 3)[2:]  # "0", "mamba.A_log"
    with pytest.raises(CheckpointError, match=f"layer {layer} lacks " + suffix.replace(".", r"\.") + "$"):
        LLM(str(ck), dtype="float32")


def test_a_misshapen_mamba_tensor_fails_naming_it(ckpt, tmp_path):
    """A_log of another d_state than the config's."""
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "s")
    (file,) = ck.glob("*.safetensors")
    tensors = load_file(str(file))
    tensors["model.layers.0.mamba.A_log"] = tensors["model.layers.0.mamba.A_log"][:, :8].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mamba\.A_log"):
        LLM(str(ck), dtype="float32")


@pytest.mark.parametrize("key,value,message", [
    ("mamba_d_state", 0, r"config\.mamba_d_state=0: want a positive integer"),
    ("mamba_expand", 0, r"config\.mamba_expand=0: want a positive integer"),
    ("mamba_dt_rank", 0, r"config\.mamba_dt_rank=0: want a positive integer"),
    ("mamba_d_conv", -1, r"config\.mamba_d_conv=-1: want a positive integer"),
    ("attn_layer_offset", -1, r"config\.attn_layer_offset=-1: want 0 <= offset < attn_layer_period=3"),
    ("expert_layer_offset", -1, r"config\.expert_layer_offset=-1: want 0 <= offset < expert_layer_period=2"),
])
def test_impossible_mamba_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)


def test_the_hubs_config_opens(ckpt, tmp_path):
    """Jamba's hub config.json: mamba_dt_rank "auto" (ceil(hidden / 16)) and num_logits_to_keep."""
    from elasticmoe.model import open_model

    ck = _copy(ckpt, tmp_path / "a")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "mamba_dt_rank": "auto", "num_logits_to_keep": 1}))
    assert open_model(str(ck)).spec.linear.dt_rank == 4
