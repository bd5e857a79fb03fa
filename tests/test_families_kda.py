"""Kimi Delta Attention (Kimi-Linear): its per-channel delta rule, the per-slot state across chunked prefill, batched
decodes, reused slots and repeated steps, against transformers alone; the hub's config and names, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from elasticmoe import LLM
from tests.slot_state_cases import (LENGTHS, _assert_transformers_alone, _prompts, _run, assert_abort_zeroes,
                                    assert_slot_reused_from_zero, family_fixtures)
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import KIMI, MORE_CASES

# transformers' in-memory names (one stacked conv1d, forget_gate.*, packed experts), a q bottleneck, a 3-tap conv,
# one expert group, un-normalised top-k
PACKED = ("KimiLinearConfig", dict(KIMI, q_lora_rank=32, linear_conv_kernel_dim=3, n_group=1, norm_topk_prob=False,
                                   linear_num_heads=2, linear_head_dim=24), "")


ckpt, ref = family_fixtures("kimi_linear", MORE_CASES["kimi_linear"])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_family_checkpoint("kimi_linear", tmp_path_factory.mktemp("kda_p") / "k", case=PACKED, packed=True)


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 150])
def test_chunked_per_channel_rule_is_the_recurrent_rule_and_transformers(length):
    """The blocks of 64 (a last shorter one unpadded) with a gate per key channel give the token-by-token rule's
    outputs and state, and transformers' own chunk_kimi_delta_attention's, from a non-zero state."""
    from transformers.models.kimi_linear.modeling_kimi_linear import chunk_kimi_delta_attention

    from elasticmoe.model.deltanet import chunked_rule, recurrent_rule
    from elasticmoe.model.kda import block_terms

    gen = torch.Generator().manual_seed(length)
    h, dk, dv = 2, 8, 6
    q, k = (torch.nn.functional.normalize(torch.randn(h, length, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(h, length, dv, generator=gen)
    g = -torch.rand(h, length, dk, generator=gen) * 0.5  # per channel
    beta, s0 = torch.rand(h, length, generator=gen), torch.randn(h, dk, dv, generator=gen)
    out, s = chunked_rule(q * dk**-0.5, k, v, g, beta, s0, block_terms)
    want, want_s = recurrent_rule(q * dk**-0.5, k, v, g, beta, s0)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(s, want_s, atol=1e-5)
    theirs, theirs_s = chunk_kimi_delta_attention(*(x.transpose(0, 1)[None] for x in (q, k, v, g, beta)),
                                                  initial_state=s0[None], output_final_state=True)
    assert torch.allclose(out, theirs[0].transpose(0, 1), atol=1e-5) and torch.allclose(s, theirs_s[0], atol=1e-5)


def test_both_layer_kinds_are_built(ckpt):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.kda import KimiDeltaAttention

    llm = LLM(str(ckpt), dtype="float32")
    layers = [layer.attn for layer in llm.engine.model.layers]
    assert [type(a) for a in layers] == [KimiDeltaAttention, Attention, KimiDeltaAttention]
    assert layers[1].spec.kind == "mla" and not layers[1].rope  # no rotary on its MLA layers
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []


@pytest.mark.parametrize("budget", [2048, 24, 2])
def test_a_long_prompt_in_one_and_in_chunks_matches_transformers(ckpt, ref, budget):
    """150 tokens (past two 64-token blocks) prefilled whole, in chunks of 24 and of 2 (shorter than the conv's
    3-token window): transformers' greedy tokens; whole-prompt logits within 1e-4."""
    ids = _prompts([150])[0]
    llm = LLM(str(ckpt), dtype="float32", max_num_batched_tokens=budget)
    _assert_transformers_alone(ref, [ids], _run(llm.engine, [ids]))
    if budget == 2048:
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0]
        assert _rel(llm.logits(ids), theirs) < 1e-4


def test_packed_variant_in_transformers_names_matches_transformers(packed):
    ref = AutoModelForCausalLM.from_pretrained(str(packed), dtype=torch.float32).eval()
    names = load_file(packed / "model.safetensors")
    assert "model.layers.0.self_attn.conv1d.weight" in names and "model.layers.0.self_attn.forget_gate.A_log" in names
    ids = _prompts([70])[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    llm = LLM(str(packed), dtype="float32", max_num_seqs=3, max_num_batched_tokens=7)
    assert _rel(llm.logits(ids), theirs) < 1e-4
    prompts = _prompts([33, 1, 2, 9], seed=5)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


def test_the_hubs_config_names_its_layers_from_one(ckpt, ref, tmp_path):
    """The hub's config.json: layer kinds from linear_attn_config (1-based kda_layers / full_attn_layers, its head
    sizes and conv) and first_k_dense_replace, no layer_types / mlp_layer_types: the same model as transformers'."""
    ck = _copy(ckpt, tmp_path / "hub")
    cfg = json.loads((ck / "config.json").read_text())
    for key in ("layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"):
        cfg.pop(key)
    cfg.update(linear_attn_config=dict(kda_layers=[1, 3], full_attn_layers=[2], head_dim=16, num_heads=4,
                                       short_conv_kernel_size=4), first_k_dense_replace=1, moe_layer_freq=1,
               mla_use_nope=True)
    (ck / "config.json").write_text(json.dumps(cfg))
    ids = _prompts([40])[0]
    hub_ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, before = hub_ref(torch.tensor([ids])).logits[0], ref(torch.tensor([ids])).logits[0]
    assert torch.equal(theirs, before)
    assert _rel(LLM(str(ck), dtype="float32").logits(ids), theirs) < 1e-4


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes batched, two slots reused (their state from zero again)."""
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=4, max_num_batched_tokens=24)
    prompts = _prompts(LENGTHS, seed=1)
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    assert_slot_reused_from_zero(ckpt, ref)


@pytest.mark.parametrize("layer", [1, 2])
def test_a_repeated_step_reads_the_state_it_started_from(ckpt, ref, layer):
    """Steps failing at layer 1's or 2's experts (after KDA layer 0, and for layer 2 its own KDA, ran) are retried:
    the retry reads the state at the step's start, so every request gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def test_the_cache_keeps_latents_for_the_mla_layer_and_counts_the_kda_state(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    assert KVCache.bytes_per_token(spec, torch.float32) == (16 + 8) * 4  # 1 MLA layer of 3: latent + rope key
    state = sum(s.conv.numel() * s.conv.element_size() + s.rec.numel() * s.rec.element_size()
                for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32)
    assert KVCache.bytes_per_slot(spec, torch.float32) == 2 * 2 * 4 * (3 * 64 * 3 + 4 * 16 * 16)  # 2 layers, copies


def test_abort_zeroes_the_slots_state(ckpt):
    assert_abort_zeroes(ckpt, layer=2)


@pytest.mark.parametrize("tensor,shape", [
    ("model.layers.0.self_attn.kv_b_proj.weight", (128, 16)),  # MLA weights at a KDA layer
    ("model.layers.2.self_attn.conv1d.weight", (192, 1, 4)),  # the stacked conv beside the hub's three
])
def test_a_tensor_transformers_would_not_load_fails_the_load(ckpt, tmp_path, tensor, shape):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "x")
    _add_tensors(ck, {tensor: torch.ones(shape)})
    with pytest.raises(CheckpointError, match=tensor.rsplit(".", 2)[-2]):
        LLM(str(ck), dtype="float32") if "conv1d" in tensor else open_model(str(ck))


@pytest.mark.parametrize("tensor", ["model.layers.2.self_attn.f_b_proj.weight", "model.layers.0.self_attn.A_log",
                                    "model.layers.0.self_attn.v_conv1d.weight"])
def test_a_missing_kda_tensor_fails_the_load_naming_it(ckpt, tmp_path, tensor):
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "m")
    tensors = load_file(ck / "model.safetensors")
    del tensors[tensor]
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=tensor.split("layers.")[1].split(".", 1)[1].replace(".", r"\.")):
        LLM(str(ck), dtype="float32")


@pytest.mark.parametrize("key,value,message", [
    ("linear_conv_kernel_dim", 0, r"config\.linear_conv_kernel_dim=0 \(or linear_attn_config's\): want a positive"),
    ("layer_types", ["linear_attention", "sliding_attention", "linear_attention"], r"config\.layer_types=.*want 3 of"),
    ("hidden_act", "gelu_pytorch_tanh", r"config\.hidden_act='gelu_pytorch_tanh': Kimi Delta Attention's conv"),
    ("num_key_value_heads", 2, r"config\.num_key_value_heads=2: Kimi-Linear's MLA runs in transformers only"),
    ("mla_use_nope", False, r"config\.mla_use_nope=False is not supported"),
    ("linear_attn_config", {"short_conv_kernel_size": 4, "bogus": 1}, r"linear_attn_config\.bogus"),
])
def test_impossible_kda_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)


def test_a_layer_named_in_neither_list_fails(ckpt, tmp_path):
    """linear_attn_config naming layers 1 and 2 of 3: transformers leaves layer 3's kind None (its config refuses
    it): refused naming layer_types."""
    ck = _copy(ckpt, tmp_path / "n")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("layer_types")
    (ck / "config.json").write_text(json.dumps({**cfg, "linear_attn_config": {"kda_layers": [1],
                                                                               "full_attn_layers": [2]}}))
    from elasticmoe.model import CheckpointError, ModelSpecError, open_model

    with pytest.raises((CheckpointError, ModelSpecError), match=r"layer_types.*'full_attention', None\]"):
        open_model(str(ck))
