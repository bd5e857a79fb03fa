"""Rotary variants a family's checkpoints use, against transformers: tokens and logits, or a refusal naming them."""

from __future__ import annotations

import pytest

from tests.test_families import _assert_matches, make_family_checkpoint


def test_hunyuan_dynamic_rope_with_alpha_is_ntk_alpha(tmp_path):
    """HunYuan's checkpoints label their rotary "dynamic" with a fixed `alpha`: transformers' HunYuan stretches the
    base to rope_theta * alpha ** (d / (d - 2)) at every length (NTK-alpha), not the plain base."""
    from elasticmoe import LLM

    rope = dict(rope_type="dynamic", rope_theta=10000.0, factor=1.0, alpha=1000.0)
    path = make_family_checkpoint("hunyuan_v1_moe", tmp_path / "m", rope_parameters=rope)
    _assert_matches(LLM(str(path), dtype="float32"), path, "hunyuan_v1_moe")
