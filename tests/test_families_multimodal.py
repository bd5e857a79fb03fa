"""Vision-language checkpoints served on text alone through their language model (Family.text_model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from tests.hf_ref import transformers_greedy
from tests.test_families import PROMPT, REPO, _assert_matches, _rel, make_family_checkpoint
from tests.test_families_more import MORE_CASES


def _case(model_type: str, text: dict | None = None, **top) -> tuple:
    cls, fields, _ = MORE_CASES[model_type]
    return cls, {**fields, "text_config": {**fields["text_config"], **(text or {})}, **top}, ""


def _rewrite(ck: Path, fn) -> None:
    """Apply `fn` to every (name, tensor) of the checkpoint's model.safetensors: a (name, tensor) or None (dropped)."""
    from safetensors.torch import load_file, save_file

    out = {}
    for name, t in load_file(ck / "model.safetensors").items():
        if (kept := fn(name, t)) is not None:
            out[kept[0]] = kept[1].contiguous()
    save_file(out, str(ck / "model.safetensors"), metadata={"format": "pt"})


def test_qwen3_vl_moe_experts_in_hub_layout_match_transformers(tmp_path):
    """Qwen's hub checkpoints store packed experts [E, H, 2I] / [E, I, H] (x @ w), which transformers transposes on
    load: read the same way (rows not square), same logits and tokens."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("qwen3_vl_moe", tmp_path / "vl", case=_case("qwen3_vl_moe"))
    _rewrite(ck, lambda n, t: (n, t.transpose(1, 2) if n.endswith(("gate_up_proj", "experts.down_proj")) else t))
    from safetensors import safe_open

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.language_model.layers.1.mlp.experts.gate_up_proj").get_shape() == [8, 64, 96]
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "qwen3_vl_moe")


def test_qwen3_vl_moe_top_level_flag_ties_the_lm_head(tmp_path):
    """transformers ties the LM head of Qwen3VLMoeForConditionalGeneration by the top-level tie_word_embeddings
    alone: true there and false in text_config is a tied head (refused as "not settled" before), and the untied
    case (text_config's class default true, top-level false) is MORE_CASES' own."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("qwen3_vl_moe", tmp_path / "vl",
                                case=_case("qwen3_vl_moe", {"tie_word_embeddings": False}, tie_word_embeddings=True))
    from safetensors import safe_open

    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    llm = LLM(str(ck), dtype="float32")
    assert llm.files.spec.tie_word_embeddings
    _assert_matches(llm, ck, "qwen3_vl_moe")


def test_qwen3_5_moe_conflicting_tie_flags_still_refused(tmp_path):
    """Qwen3.5-MoE's checkpoints load in transformers' ForCausalLM too (text_config's flag) and in its
    ForConditionalGeneration (the top-level one): flags that differ stay refused by name."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint("qwen3_5_moe", tmp_path / "q", case=_case("qwen3_5_moe"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match="tie_word_embeddings"):
        open_model(ck)


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "glm4v_moe"])
def test_text_model_checkpoint_equals_the_vision_language_one(model_type, tmp_path):
    """The language model saved alone (model_type <type>_text, model.layers.*, no vision weights; transformers has
    no causal LM class for it) runs as the vision-language checkpoint does on text: equal to transformers'
    ForConditionalGeneration on the same ids."""
    from elasticmoe import LLM, SamplingParams

    vl = make_family_checkpoint(model_type, tmp_path / "vl", case=_case(model_type))
    text = Path(shutil.copytree(vl, tmp_path / "text"))
    cfg = json.loads((vl / "config.json").read_text())
    (text / "config.json").write_text(json.dumps({**cfg["text_config"], "tie_word_embeddings": False}))
    _rewrite(text, lambda n, t: None if n.startswith("model.visual.") else (n.replace("language_model.", ""), t))
    ref = getattr(transformers, cfg["architectures"][0]).from_pretrained(str(vl), dtype=torch.float32).eval()
    llm = LLM(str(text), dtype="float32")
    assert llm.files.config.model_type == f"{model_type}_text" and llm.files.names.root == "model.layers"
    ids = llm.encode(PROMPT)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert _rel(llm.logits(ids), theirs) < 1e-4
    out = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24 and out.token_ids == transformers_greedy(ref, ids, out.token_ids)


def test_the_readme_says_multimodal_checkpoints_run_on_text_alone():
    """README (Verified model families): each family served through its language model is named in the sentence
    that says images cannot be sent."""
    from elasticmoe.model.families import FAMILIES

    readme = " ".join((REPO / "README.md").read_text().split())
    start = readme.index("Vision-language checkpoints")
    sentence = readme[start:readme.index(".", readme.index("no images", start))]
    assert {t for t, f in FAMILIES.items() if f.text_model} == {t for t in FAMILIES if f"`{t}`" in sentence}


def test_qwen3_omni_thinker_top_level_flag_ties_the_lm_head(tmp_path):
    """Qwen3-Omni's text config has no tie_word_embeddings field: the thinker's own flag ties its LM head, as in
    transformers' Qwen3OmniMoeThinkerForConditionalGeneration (no lm_head.weight saved), same logits and tokens."""
    from safetensors import safe_open

    from elasticmoe import LLM

    ck = make_family_checkpoint("qwen3_omni_moe_thinker", tmp_path / "omni",
                                case=_case("qwen3_omni_moe_thinker", tie_word_embeddings=True))
    with safe_open(str(ck / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and any(k.startswith("audio_tower.") for k in f.keys())
    llm = LLM(str(ck), dtype="float32")
    assert llm.files.spec.tie_word_embeddings
    _assert_matches(llm, ck, "qwen3_omni_moe_thinker")
