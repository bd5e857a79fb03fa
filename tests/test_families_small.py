"""Kolibri and Beam beyond MORE_CASES' one-prompt check: chunked prefill of a batch of prompts of different lengths
against transformers alone, transformers' in-memory names, the configs they refuse; what MiMo-V2-Flash and Muse Spark
still lack."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from tests.test_families import _assert_matches, assert_batched_chunks_match_transformers_alone, make_family_checkpoint
from tests.test_families_more import MORE_CASES

SMALL = ["kolibri1", "beam"]  # the families this file covers
PROMPTS = ["Hi", "A much longer prompt about the mixture of experts and their routers", "Once upon a time there"]


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_families")
    return {t: make_family_checkpoint(t, root / t, case=MORE_CASES[t]) for t in SMALL}


@pytest.mark.parametrize("model_type", SMALL)
def test_chunked_batch_of_different_lengths_matches_transformers_alone(model_type, small_dirs):
    """Three prompts (2 to 60 tokens) at once, prefilled in steps of at most 8 tokens (chunks past the sliding
    window of 8), 10 greedy tokens each: each equals transformers' greedy tokens for that prompt alone."""
    assert_batched_chunks_match_transformers_alone(small_dirs[model_type], PROMPTS, budget=8, max_tokens=10)


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
    from elasticmoe.model import ModelSpecError, open_model

    ck = _with_config(small_dirs["kolibri1"], tmp_path, sliding_window=None, layer_types=["full_attention"] * 3)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="sliding_window"), torch.no_grad():  # transformers' own forward
        ref(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ModelSpecError, match=r"config\.sliding_window is null: transformers' 'kolibri1' builds"):
        open_model(str(ck))


ROPE_10K = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("rope,rotates,tables", [
    ({"sliding_attention": ROPE_10K, "full_attention": {"rope_type": "default", "rope_theta": 500.0}},
     (True, True, True), 2),
    ({"sliding_attention": None, "full_attention": None}, (False, False, False), 1),
])
def test_beam_rope_per_layer_type_matches(tmp_path, rope, rotates, tables):
    """rope_parameters keyed by layer type go through the per-type rotary tables: both types rotating, each at its
    own base (was refused), or both null (every layer NoPE, queries scaled with the position); logits and greedy
    tokens transformers'."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("beam", tmp_path / "b", case=MORE_CASES["beam"], rope_parameters=rope)
    llm = LLM(str(ck), dtype="float32")
    spec = llm.engine.model.spec
    assert spec.attention.rope_layers == rotates and len(spec.rope_tables) == tables
    _assert_matches(llm, ck, "beam")


def test_beam_layer_type_without_an_entry_is_refused(small_dirs, tmp_path):
    """Every layer type needs an entry in rope_parameters (transformers fails on a missing one); null means NoPE."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _with_config(small_dirs["beam"], tmp_path, rope_parameters={"sliding_attention": ROPE_10K})
    with pytest.raises(ModelSpecError, match=r"config\.rope_parameters\.full_attention is missing: layers of that "
                                             r"type need an entry \(null: no rotary\)"):
        open_model(str(ck))


@pytest.mark.parametrize("model_type", ["laguna", "mellum"])
def test_a_null_layer_type_rotary_is_refused_where_transformers_has_no_nope(model_type):
    """Laguna and Mellum build a rotary for every layer type: a null entry is refused (not run as NoPE, as Beam's)."""
    from elasticmoe.model import ModelSpecError
    from elasticmoe.model.spec import spec_from_config

    cls_name, fields, _ = MORE_CASES[model_type]
    cfg = getattr(transformers, cls_name)(**{**fields, "num_hidden_layers": 3, "hidden_size": 64,
                                             "num_attention_heads": 4, "num_key_value_heads": 2})
    cfg.rope_parameters = {"sliding_attention": ROPE_10K, "full_attention": None}
    with pytest.raises(ModelSpecError, match=r"config\.rope_parameters\.full_attention is missing: layers of that "
                                             r"type need a rotary"):
        spec_from_config(cfg)


@pytest.mark.parametrize("cap", [0, -1.0, float("inf"), float("nan")])
def test_a_soft_cap_that_is_not_a_finite_positive_number_is_refused(small_dirs, tmp_path, cap):
    from elasticmoe.model import ModelSpecError, open_model

    ck = _with_config(small_dirs["beam"], tmp_path, final_logit_softcapping=cap)
    with pytest.raises(ModelSpecError, match=r"config\.final_logit_softcapping=.*want a finite positive number"):
        open_model(str(ck))


def test_beam_without_a_soft_cap_matches(tmp_path):
    """final_logit_softcapping null: the logits are the LM head's, as transformers'."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("beam", tmp_path / "b", case=MORE_CASES["beam"], final_logit_softcapping=None)
    llm = LLM(str(ck), dtype="float32")
    assert llm.engine.model.spec.logit_softcap is None
    _assert_matches(llm, ck, "beam")


def _with_config(src, tmp_path, **changes):
    """A copy of the checkpoint `src` with config.json fields changed."""
    import json
    import shutil

    ck = shutil.copytree(src, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **changes}))
    return ck


@pytest.mark.parametrize("model_type,lacks", [
    ("muse_spark_text", "experts run at a pooled width (moe_hidden_size) with a norm on each expert's output"),
])
def test_the_families_still_refused_name_what_they_lack(model_type, lacks):
    """MiMo-V2-Flash's sliding layers have twice the KV heads of its full ones, Muse Spark's experts run between a
    pre_expert_proj and a post_expert_proj with a post_expert_norm inside each: the refusals named neither."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from elasticmoe.model import ModelSpecError
    from elasticmoe.model.spec import check_model_type

    with pytest.raises(ModelSpecError, match=re.escape(lacks)):
        check_model_type(CONFIG_MAPPING[model_type]())
