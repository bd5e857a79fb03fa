"""Expert weights unlike the config's sizes: the error names the file, the tensor and the shape the config wants,
in either expert layout and whatever dtype the experts are held in."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe.model.tiny import make_tiny_model


def _narrowed(tmp_path, layout: str):
    """A tiny qwen3_moe checkpoint (experts of I = 64) whose config.json says moe_intermediate_size 48."""
    ck = make_tiny_model("qwen3_moe", tmp_path / layout, layers=2, layout=layout)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 48}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers refuses it too
        AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    return ck


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_per_expert_weight_of_another_size_names_its_file(tmp_path, dtype):
    """Held in another dtype than stored (float32 on disk), the error named only the checkpoint directory."""
    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = _narrowed(tmp_path, "per-expert")
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{re.escape(name)}' gives a \[64, 64\] tensor, "
                                              r"want \[48, 64\]"):
        LLM(str(ck), dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_packed_expert_row_of_another_size_names_the_shape_the_config_wants(tmp_path, dtype):
    """A packed row of neither [2I, H] nor [H, 2I] was read transposed, so the error wanted [H, 2I] ([64, 96])."""
    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = _narrowed(tmp_path, "packed")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: '{re.escape(name)}' gives a \[128, 64\] tensor, "
                                              r"want \[96, 64\]"):
        LLM(str(ck), dtype=dtype)
