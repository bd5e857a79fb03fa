"""Configs refused by name before any weight is read: a router no top-k can follow, a key supported only at its
neutral value, and MoE families whose non-MoE parts this project does not run (tests/test_families.py: the
families it does run, against transformers)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.test_families import _copy


@pytest.mark.parametrize("family,key,value,message", [
    ("mixtral", "num_experts_per_tok", 9, r"config\.num_experts_per_tok=9: .*8 experts"),
    ("deepseek_v3", "n_group", 3, r"config\.n_group=3 does not divide the 8 experts"),
    ("deepseek_v3", "topk_group", 5, r"config\.topk_group=5: want 1 to n_group \(4\)"),
    ("deepseek_v3", "topk_group", 0, r"config\.topk_group=0: want 1 to n_group \(4\)"),
    ("deepseek_v3", "num_experts_per_tok", 5, r"config\.num_experts_per_tok=5: .*topk_group"),
])
def test_impossible_routing_config_fails_naming_the_field(tmp_path, tiny_models, family, key, value, message):
    """A router config no top-k can follow fails at open naming the field, not at the first forward deep inside."""
    from elasticmoe.model import ModelSpecError, open_model

    bad = _copy(tiny_models[family], tmp_path / "r")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ModelSpecError, match=message):
        open_model(str(bad))


def test_key_supported_only_at_its_neutral_value(tmp_path, tiny_models):
    from elasticmoe.model import ModelSpecError, open_model

    bad = _copy(tiny_models["olmoe"], tmp_path / "o")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["clip_qkv"] = 8.0
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match=r"config\.clip_qkv=8\.0 is not supported for model_type 'olmoe'"):
        open_model(str(bad))


REJECTED_CASES = [  # (config class, model_type, words the message must hold)
    ("Step3p7TextConfig", "step3p5", "no causal LM of it, only the language model inside 'step3p7'"),
    ("DeepseekV4Config", "deepseek_v4", "hyper-connections"),
]


@pytest.mark.parametrize("cls_name,model_type,feature", REJECTED_CASES)
def test_rejected_family_names_model_type_and_feature(cls_name, model_type, feature, tmp_path):
    """Rejected from config.json alone, before any weight is read (the one stored tensor is never opened)."""
    from safetensors.torch import save_file

    from elasticmoe.model import ModelSpecError, open_model

    getattr(transformers, cls_name)().save_pretrained(tmp_path)
    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelSpecError) as err:
        open_model(str(tmp_path))
    assert f"model_type '{model_type}'" in str(err.value) and feature in str(err.value)
