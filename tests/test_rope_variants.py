"""Rotary variants a family's checkpoints use, against transformers: tokens and logits, or a refusal naming them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_families import _assert_matches, make_family_checkpoint


def test_hunyuan_dynamic_rope_with_alpha_is_ntk_alpha(tmp_path):
    """HunYuan's checkpoints label their rotary "dynamic" with a fixed `alpha`: transformers' HunYuan stretches the
    base to rope_theta * alpha ** (d / (d - 2)) at every length (NTK-alpha), not the plain base."""
    from elasticmoe import LLM

    rope = dict(rope_type="dynamic", rope_theta=10000.0, factor=1.0, alpha=1000.0)
    path = make_family_checkpoint("hunyuan_v1_moe", tmp_path / "m", rope_parameters=rope)
    _assert_matches(LLM(str(path), dtype="float32"), path, "hunyuan_v1_moe")


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_null_head_dim_with_a_scaled_rope_is_hidden_over_heads(tmp_path, rope_type):
    """`head_dim: null` means hidden_size // num_attention_heads, as transformers' attention and default rope derive
    it; its yarn / dynamic initialisers read the None and fail with a bare TypeError. The same checkpoint with the
    derived head_dim written out is the reference (GLM-4-MoE: partial rotary, so the rope dims follow head_dim)."""
    import json

    from elasticmoe import LLM

    rope = dict(rope_type=rope_type, rope_theta=10000.0, factor=2.0, partial_rotary_factor=0.5,
                **(dict(original_max_position_embeddings=1024) if rope_type == "yarn" else {}))
    ref = make_family_checkpoint("glm4_moe", tmp_path / "ref", rope_parameters=rope)
    null = Path(shutil.copytree(ref, tmp_path / "null"))
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    (null / "config.json").write_text(json.dumps({**cfg, "head_dim": None}))
    llm = LLM(str(null), dtype="float32")
    assert llm.files.spec.attention.head_dim == cfg["head_dim"]
    _assert_matches(llm, ref, "glm4_moe")
