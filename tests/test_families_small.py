"""Kolibri (and the other small families of MORE_CASES) beyond the one-prompt check: chunked prefill of a batch of
prompts of different lengths against transformers alone, transformers' in-memory names, configs without a window."""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.test_families import _assert_matches, make_family_checkpoint
from tests.test_families_more import MORE_CASES

SMALL = ["kolibri1"]  # the families this file covers
PROMPTS = ["Hi", "A much longer prompt about the mixture of experts and their routers", "Once upon a time there"]


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_families")
    return {t: make_family_checkpoint(t, root / t, case=MORE_CASES[t]) for t in SMALL}


@pytest.mark.parametrize("model_type", SMALL)
def test_chunked_batch_of_different_lengths_matches_transformers_alone(model_type, small_dirs):
    """Three prompts (2 to 60 tokens) at once, prefilled in steps of at most 8 tokens (chunks past the sliding
    window of 8), 10 greedy tokens each: each equals transformers' greedy tokens for that prompt alone."""
    from elasticmoe import LLM, SamplingParams

    path = small_dirs[model_type]
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=8)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = [llm.encode(p) for p in PROMPTS]
    assert max(len(i) for i in ids) > 3 * 8
    outs = llm.generate(ids, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(ids, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                pad_token_id=ref.config.pad_token_id)[0, len(prompt):].tolist()
        assert out.token_ids == want


def test_kolibri_in_transformers_names_matches(tmp_path):
    """Kolibri written with transformers' in-memory names (post_self_attn_layernorm, post_mlp_layernorm,
    mlp.gate.e_score_correction_bias; the hub's are post_attn_norm, post_ffn_norm, moe.router.expert_bias) and
    packed experts: every tensor used, the correction bias loaded, logits and tokens transformers'."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("kolibri1", tmp_path / "k", case=MORE_CASES["kolibri1"], packed=True)
    llm = LLM(str(ck), dtype="float32")
    assert llm.files.names.packed and llm.files.names.unused() == []
    assert any(n.endswith("post_self_attn_layernorm.weight") for n in llm.files.names.used)
    assert all(layer.router_bias is not None for layer in llm.engine.model.layers)
    _assert_matches(llm, ck, "kolibri1")


def test_kolibri_without_a_window_is_refused(small_dirs, tmp_path):
    """sliding_window null (every layer full attention): transformers' Kolibri builds a sliding-window mask for
    every forward and fails; the load fails naming the field (it was served, rotating every layer)."""
    import json
    import shutil

    from elasticmoe.model import ModelSpecError, open_model

    ck = shutil.copytree(small_dirs["kolibri1"], tmp_path / "k")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(sliding_window=None, layer_types=["full_attention"] * 3)
    (ck / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="sliding_window"), torch.no_grad():  # transformers' own forward
        ref(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ModelSpecError, match=r"config\.sliding_window is null: transformers' 'kolibri1' builds"):
        open_model(str(ck))
