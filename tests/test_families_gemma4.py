"""Gemma 4 text beyond tests/test_families_more.py: a batch of different lengths with chunked prefills against
transformers alone, its per-layer shapes and rotary through AttentionSpec.layer and the per-type tables, decode groups,
the KV cache of shared layers (none held, none counted), its gated tanh-GELU experts on gRPC shards, and its configs
and tensors refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_families import _copy, assert_batched_chunks_match_transformers_alone, make_family_checkpoint
from tests.test_families_more import MORE_CASES

PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. Experts and their layers", "Once upon a time", "Z"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_family_checkpoint("gemma4_text", tmp_path_factory.mktemp("gemma4") / "g",
                                  case=MORE_CASES["gemma4_text"])


def test_batch_of_different_lengths_in_chunks_equals_transformers_alone(gemma):
    """Four prompts batched, the long one prefilled in chunks of 16 tokens past the sliding window of 8, and
    decoded together (shared layers reading their sources' caches across steps): each one's greedy tokens are
    transformers' for that prompt alone."""
    assert_batched_chunks_match_transformers_alone(gemma, PROMPTS, budget=16, max_tokens=12)


def test_per_layer_shapes_and_rotary_go_through_the_layer_spec(gemma):
    """per_layer_config's head dim and KV heads of the full layers are AttentionSpec.layer(i)'s, beside the query
    heads it gives every layer; their rotary is one of the per-layer-type tables: proportional, 16 frequencies for a
    head of 32 dims, the 12 past partial_rotary_factor 0.25 at 0 (unrotated)."""
    from elasticmoe.model import open_model

    spec = open_model(str(gemma)).spec
    a = spec.attention
    assert [(a.layer(i).num_heads, a.layer(i).head_dim, a.layer(i).num_kv_heads) for i in range(6)] == \
        [(4, 16, 2), (4, 16, 2), (4, 32, 1)] * 2
    assert a.rope_sets == (1, 1, 0, 1, 1, 0)  # full_attention, sliding_attention: sorted
    full, sliding = (inv for inv, _ in spec.rope_tables)
    assert (len(full), int((full == 0).sum()), len(sliding), int((sliding == 0).sum())) == (16, 12, 8, 0)


def test_decode_groups_read_the_shared_caches_and_get_solo_tokens(request, monkeypatch):
    """tests/test_families_per_layer.py's decode groups on Gemma 4: six requests of 1 to 60 tokens joining at
    different steps, prefilled in chunks of 16, decoded in 3 or more groups a step, the shared layers reading each
    group's rows from their sources' caches: the tokens each gets alone."""
    from tests import test_families_per_layer as per_layer

    per_layer.test_decode_groups_over_per_layer_heads_and_rotaries_get_solo_tokens("gemma", request, monkeypatch)


def test_kv_shared_layers_hold_and_count_no_cache(gemma):
    """Layers 4 and 5 read layers 3's and 2's keys and values: their cache entries are those tensors, nothing is
    allocated for them, clearing a slot zeroes what they read, and bytes_per_token counts the four layers that
    hold one (sliding: 2 kv heads x (16 + 16), full: 1 kv head x (32 + 32) floats): 3 slots of 40 positions in blocks
    of 16, 3 blocks a slot, and the null block."""
    from elasticmoe import LLM
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(gemma), dtype="float32")
    spec = llm.engine.spec
    assert spec.attention.kv_source == (0, 1, 2, 3, 3, 2)
    cache = KVCache(spec, 3, 40, torch.float32, torch.device("cpu"))
    assert cache.layers[4] is cache.layers[3] and cache.layers[5] is cache.layers[2]
    assert [tuple(t.shape) for t in cache.layers[2]] == [(3 * 3 + 1, 16, 1, 32)] * 2
    assert KVCache.bytes_per_token(spec, torch.float32) == 4 * 64 * 4
    held = {id(t): t.numel() * t.element_size() for layer in cache.layers for t in layer}
    assert sum(held.values()) == KVCache.bytes_per_token(spec, torch.float32) * (3 * 3 + 1) * 16
    assert cache.owned == [0, 1, 2, 3]
    for t in cache.layers[5]:
        t.fill_(1.0)
    cache.clear(1, 40)
    assert all(cache.of_slot(t, 1).abs().sum() == 0 and cache.of_slot(t, 0).abs().sum() > 0 for t in cache.layers[5])


def test_gelu_experts_on_two_grpc_shards_match_in_process(gemma):
    """Gated tanh-GELU experts split over two in-process gRPC shards, their top-k weights scaled per expert by the
    router: the greedy tokens of the in-process model."""
    from elasticmoe import LLM
    from tests.shard_util import assert_two_shards_match_in_process

    llm = LLM(str(gemma), dtype="float32")
    assert llm.files.spec.moe.expert_act == "gelu_tanh"
    assert_two_shards_match_in_process(llm, PROMPTS[:2], max_tokens=16)


@pytest.mark.parametrize("key,value,message", [
    ("use_bidirectional_attention", "all", r"config\.use_bidirectional_attention='all' is not supported"),
    ("enable_moe_block", False, r"config\.enable_moe_block=False is not supported"),
    ("per_layer_config", {"1": {"intermediate_size": 32}}, r"per_layer_config overrides \['intermediate_size'\]"),
    ("hidden_activation", "gelu", r"config\.hidden_activation=.gelu.: gated MLPs"),
    ("vocab_size_per_layer_input", 256, r"config\.vocab_size_per_layer_input=256: want vocab_size \(512\)"),
    ("num_kv_shared_layers", 6, r"config\.num_kv_shared_layers=6: want 0 to 5"),
    ("per_layer_config", {"2": {"head_dim": 32, "num_key_value_heads": 3}, "5": {"head_dim": 32}},
     r"config\.per_layer_config\[2\]: head_dim=32, num_key_value_heads=3: want positive ints, the KV heads dividing"),
    ("per_layer_config", {"2": {"head_dim": 32}}, r"config\.per_layer_config: full_attention layers of head dims "
                                                  r"\[16, 32\]"),
])
def test_config_it_cannot_follow_fails_naming_it(gemma, tmp_path, key, value, message):
    from elasticmoe.model import ModelSpecError, open_model

    bad = _copy(gemma, tmp_path / "c")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ModelSpecError, match=message):
        open_model(str(bad))


def test_a_value_projection_where_values_are_the_keys_fails_naming_it(gemma, tmp_path):
    """attention_k_eq_v: full-attention layers have no v_proj (transformers would drop one); a stored one fails the
    load, named, and so does a checkpoint without the per-layer inputs' table."""
    from safetensors.torch import load_file, save_file

    from elasticmoe.model import CheckpointError, open_model

    bad = _copy(gemma, tmp_path / "v")
    tensors = load_file(bad / "model.safetensors")
    save_file({**tensors, "model.layers.2.self_attn.v_proj.weight": torch.ones(32, 64)}, str(bad / "model.safetensors"),
              metadata={"format": "pt"})
    from elasticmoe import LLM

    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight.*config\.attention_k_eq_v"):
        LLM(str(bad), dtype="float32")
    del tensors["model.embed_tokens_per_layer.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens_per_layer\.weight' is not in the checkpoint"):
        open_model(str(bad))
