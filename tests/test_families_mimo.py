"""MiMo-V2-Flash beyond tests/test_families_more.py: a batch of different lengths with chunked prefills against
transformers alone, its per-layer KV heads, value head dim and sinks through AttentionSpec.layer and the KV cache, and a
sink stored on a full layer refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_families import assert_batched_chunks_match_transformers_alone, make_family_checkpoint
from tests.test_families_more import MORE_CASES

PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. Experts and their layers", "Once upon a time", "Z"]


@pytest.fixture(scope="module")
def mimo(tmp_path_factory):
    return make_family_checkpoint("mimo_v2_flash", tmp_path_factory.mktemp("mimo") / "m",
                                  case=MORE_CASES["mimo_v2_flash"])


def test_batch_of_different_lengths_in_chunks_equals_transformers_alone(mimo):
    """Four prompts batched, the long one prefilled in chunks of 16 tokens past the sliding window of 8, decoded
    together: each one's greedy tokens are transformers' for that prompt alone."""
    assert_batched_chunks_match_transformers_alone(mimo, PROMPTS, budget=16, max_tokens=12)


def test_sliding_layers_double_kv_heads_and_hold_the_sinks(mimo):
    """Full layers 0 and 3: 1 KV head, no sinks; sliding layers 1 and 2: 2 KV heads and sinks; values 16 wide against
    q/k heads of 24 in every layer, rescaled by 0.5; the cache holds each layer at its own width and counts it."""
    from elasticmoe.model import open_model
    from elasticmoe.model.attention import KVCache

    spec = open_model(str(mimo)).spec
    a = spec.attention
    assert [(a.layer(i).num_kv_heads, a.layer(i).head_dim, a.layer(i).v_head_dim, a.layer(i).sinks)
            for i in range(4)] == [(1, 24, 16, False), (2, 24, 16, True), (2, 24, 16, True), (1, 24, 16, False)]
    assert a.v_scale == 0.5
    cache = KVCache(spec, 2, 8, torch.float32, torch.device("cpu"))
    assert [tuple(t.shape[2:]) for layer in cache.layers for t in layer] == \
        [(1, 24), (1, 16), (2, 24), (2, 16), (2, 24), (2, 16), (1, 24), (1, 16)]
    assert KVCache.bytes_per_token(spec, torch.float32) == 4 * (1 + 2 + 2 + 1) * (24 + 16)


def test_a_sink_on_a_full_layer_is_refused(mimo, tmp_path):
    """transformers builds no sinks on full layers (and drops a stored one): a checkpoint holding one is refused
    by name, not run without it."""
    import shutil

    from elasticmoe.model import open_model
    from elasticmoe.model.checkpoint import CheckpointError

    bad = tmp_path / "m"
    shutil.copytree(mimo, bad)
    path = next(bad.glob("*.safetensors"))
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.attention_sink_bias"] = torch.zeros(4)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.attention_sink_bias"):
        open_model(str(bad))
