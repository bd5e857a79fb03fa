"""Gemma 4 with its vision and audio encoders, served on text alone through its language model (gemma4_text)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from tests.hf_ref import transformers_greedy
from tests.test_families import PROMPT, _rel, make_family_checkpoint
from tests.test_families_more import MORE_CASES


@pytest.fixture(scope="module")
def gemma4_dir(tmp_path_factory) -> Path:
    return make_family_checkpoint("gemma4", tmp_path_factory.mktemp("gemma4") / "g", case=MORE_CASES["gemma4"])


def _edited(src: Path, dst: Path, fn) -> Path:
    """A copy of checkpoint `src` whose config.json dict went through `fn` (in place)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    fn(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_placeholders_in_a_batch_match_transformers_alone(gemma4_dir):
    """Prompts of different lengths holding image (225), video (83) and audio (92) placeholder ids, batched and
    prefilled in chunks of 16 tokens: each request's logits and 16 greedy tokens equal transformers' on that prompt alone
    (placeholders embedded as the pad token, main and per-layer embeddings)."""
    from elasticmoe import LLM, SamplingParams

    ref = transformers.Gemma4ForConditionalGeneration.from_pretrained(str(gemma4_dir), dtype=torch.float32).eval()
    llm = LLM(str(gemma4_dir), dtype="float32", max_num_batched_tokens=16)
    full = llm.encode(PROMPT)
    prompts = [full, [225, 225, 83, 92] + full[5:20], full[:11] + [92, 225]]
    assert all({225, 83, 92} & set(p) for p in prompts)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0].float()
        assert _rel(llm.logits(ids), theirs) < 1e-4
        assert len(out.token_ids) == 16 and out.token_ids == transformers_greedy(ref, ids, out.token_ids)


def test_spec_reads_placeholders_and_ignores_the_encoders(gemma4_dir):
    """The three placeholder ids reach the spec (sorted); the language model is read under model.language_model."""
    from elasticmoe.model import open_model

    files = open_model(gemma4_dir)
    assert files.spec.placeholder_ids == (83, 92, 225) and files.spec.model_type == "gemma4_text"
    assert files.names.root == "model.language_model.layers"


def test_bidirectional_attention_over_all_tokens_refused(gemma4_dir, tmp_path):
    """text_config.use_bidirectional_attention "vision" acts only with images (causal on text); "all" makes
    every layer bidirectional: refused by name."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _edited(gemma4_dir, tmp_path / "all", lambda c: c["text_config"].update(use_bidirectional_attention="all"))
    with pytest.raises(ModelSpecError, match="use_bidirectional_attention"):
        open_model(ck)


def test_placeholders_without_a_pad_token_refused(gemma4_dir, tmp_path):
    """With no text_config.pad_token_id the placeholders have no embedding to take: refused by name."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _edited(gemma4_dir, tmp_path / "nopad", lambda c: c["text_config"].update(pad_token_id=None))
    with pytest.raises(ModelSpecError, match="pad_token_id"):
        open_model(ck)
