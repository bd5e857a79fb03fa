"""Mixture-of-attention heads, JetMoE: its router, chunked prefill, batched decodes through slots and repeated steps
against transformers alone; the KV cache it keeps, and the strict loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from elasticmoe import LLM
from tests.slot_state_cases import (assert_batched_like_transformers, assert_prompt_in_chunks, family_fixtures,
                                    variant_like_transformers)
from tests.test_families import _copy, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import JETMOE, MORE_CASES

# 3 attention experts a token (6 query heads over 2 KV heads), tied embeddings, layer and final norm eps alike
WIDE_K = ("JetMoeConfig", dict(JETMOE, num_experts_per_tok=3, rms_norm_eps=1e-6, tie_word_embeddings=True), "")


ckpt, ref = family_fixtures("jetmoe", MORE_CASES["jetmoe"])


@pytest.fixture(scope="module")
def wide_k(tmp_path_factory):
    return make_family_checkpoint("jetmoe", tmp_path_factory.mktemp("moa_k") / "j", case=WIDE_K)


def test_every_layer_is_moa_over_one_cached_set_of_keys(ckpt):
    from elasticmoe.model.attention import KVCache
    from elasticmoe.model.moa import MoA

    llm = LLM(str(ckpt), dtype="float32")
    spec = llm.engine.spec
    a = spec.attention
    assert [type(layer.attn) for layer in llm.engine.model.layers] == [MoA] * 3
    assert (a.moa_experts, a.num_heads, a.num_kv_heads, a.head_dim) == (8, 4, 2, 24)
    assert KVCache.bytes_per_token(spec, torch.float32) == 3 * 2 * 2 * 24 * 4  # keys and values of 2 heads
    assert spec.layer_norm_eps == 1e-6 and spec.rms_norm_eps == 0.05
    assert all(layer.extras["moe_bias"].abs().min() > 0 for layer in llm.engine.model.layers)


@pytest.mark.parametrize("which", ["ckpt", "wide_k"])
def test_the_router_picks_and_weighs_as_transformers(which, request):
    """Each layer's attention router on the same input: transformers' experts (sorted) and their weights."""
    path = request.getfixturevalue(which)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    llm = LLM(str(path), dtype="float32")
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    for ours, theirs in zip(llm.engine.model.layers, ref.model.layers):
        gate = theirs.self_attention.experts.router
        with torch.no_grad():
            logits = gate.layer(x).float()
        best, want = logits.topk(gate.top_k, dim=1)
        ids, weights = ours.attn.route(x)
        assert torch.equal(ids.sort(-1).values, want.sort(-1).values)
        order = ids.argsort(-1)
        assert torch.allclose(weights.gather(1, order), best.softmax(1).gather(1, want.argsort(-1)), atol=1e-6)


@pytest.mark.parametrize("which", ["ckpt", "wide_k"])
def test_prompt_logits_match_transformers_in_one_and_in_chunks(which, request):
    """60 tokens in one prefill and in chunks of 24 and of 2 (each chunk's queries over the keys cached before);
    logits of the whole prompt within 1e-4, the next token equal."""
    assert_prompt_in_chunks(request.getfixturevalue(which), 60)


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes of different lengths batched, two slots reused."""
    assert_batched_like_transformers(ckpt, ref, [150, 1, 37, 2, 5, 64], seed=1, max_num_seqs=4, budget=24)


def test_wider_top_k_batches_match_transformers_alone(wide_k):
    llm = variant_like_transformers(wide_k, [33, 1, 2, 9], seed=5, max_num_seqs=3, budget=7)
    assert llm.engine.spec.tie_word_embeddings and llm.engine.spec.attention.num_heads == 6


def test_a_repeated_step_gives_transformers_tokens(ckpt, ref):
    """Steps failing at layer 1's experts (after layer 0's and 1's keys were cached) are retried."""
    assert_retried_steps_exact(ckpt, ref, 1)


def _without(ck, tmp_path, name: str):
    out = _copy(ck, tmp_path / "w")
    tensors = load_file(out / "model.safetensors")
    del tensors[name]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("name", ["model.layers.1.self_attention.experts.router.layer.weight",
                                  "model.layers.2.self_attention.kv_proj.weight",
                                  "model.layers.0.self_attention.experts.output_linear.weight",
                                  "model.layers.1.self_attention.experts.bias",
                                  "model.layers.2.mlp.bias"])
def test_a_missing_tensor_fails_the_load_naming_it(ckpt, tmp_path, name):
    from elasticmoe.model import CheckpointError

    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        LLM(str(_without(ckpt, tmp_path, name)), dtype="float32")


@pytest.mark.parametrize("name,tensor", [
    ("model.layers.0.self_attention.q_proj.weight", torch.ones(48, 64)),  # a dense query: JetMoE has none
    ("model.layers.0.self_attention.kv_proj.bias", torch.ones(96)),  # transformers builds kv_proj without one
    ("model.layers.1.self_attention.kv_proj.weight", torch.ones(80, 64)),  # rows for neither 2 x 2 x 24
])
def test_a_tensor_transformers_would_not_load_fails_naming_it(ckpt, tmp_path, name, tensor):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "x")
    tensors = load_file(ck / "model.safetensors")
    save_file({**tensors, name: tensor}, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        open_model(str(ck))


@pytest.mark.parametrize("key,value,message", [
    ("activation_function", "relu", r"config\.activation_function='relu'"),
    ("kv_channels", 0, r"config\.kv_channels=0: want a positive integer"),
    ("num_key_value_heads", 0, r"config\.num_key_value_heads=0: want a positive integer"),
])
def test_impossible_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)


def test_weights_of_another_head_dim_fail_naming_the_tensor(ckpt, tmp_path):
    """config.kv_channels 16 against weights of 24-dim heads: kv_proj's rows are named (keys then values)."""
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "d")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "kv_channels": 16}))
    with pytest.raises(CheckpointError, match=r"self_attention\.kv_proj\.weight' has 96 rows, want 64"):
        open_model(str(ck))


def test_the_query_heads_are_the_experts_heads_whatever_num_attention_heads_says(ckpt, tmp_path):
    """transformers' attention never reads config.num_attention_heads: a stale 6 leaves 2 experts x 2 heads."""
    from elasticmoe.model import open_model

    ck = _copy(ckpt, tmp_path / "h")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 6}))
    assert open_model(str(ck)).spec.attention.num_heads == 4


def test_experts_served_on_two_shards_are_the_mlps_only(ckpt):
    """The expert half gets the MLP's packed experts (mlp.input_linear / output_linear), never the attention
    experts (the gateway's dense half runs those): served through two in-process gRPC shards (experts 0-3, 4-7),
    the greedy tokens of the single process, both shards serving."""
    from tests.shard_util import assert_two_shards_match_in_process

    llm = LLM(str(ckpt), dtype="float32")
    refs = llm.files.names.experts
    assert len(refs) == 3 * 8 and {(r.gate_up.split(".", 3)[3], r.down.split(".", 3)[3]) for r in refs.values()} == {
        ("mlp.input_linear.weight", "mlp.output_linear.weight")}
    assert_two_shards_match_in_process(llm, ["The quick brown fox", "a b c d e f g h i j k l m n o p"], 8)
