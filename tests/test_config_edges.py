"""Config values at their edges (a zero sliding window), held to what transformers does with the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.test_families import _assert_matches, make_family_checkpoint

MIXTRAL = ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8), "")
QWEN2_SLIDING = ("Qwen2MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                        shared_expert_intermediate_size=64, use_sliding_window=True,
                                        max_window_layers=3), "")


@pytest.mark.parametrize("model_type, case", [("mixtral", MIXTRAL), ("qwen2_moe", QWEN2_SLIDING)])
def test_a_zero_sliding_window_is_refused_naming_the_field(tmp_path, model_type, case):
    """sliding_window=0 on layers that slide: transformers fails every forward (its window mask keeps no key);
    we ran full attention instead, silently. Now the open fails, naming config.sliding_window."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = make_family_checkpoint(model_type, tmp_path / "m", case=case, sliding_window=0)
    assert json.loads((ck / "config.json").read_text())["sliding_window"] == 0
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        ref(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(ModelSpecError, match=r"config\.sliding_window=0: .*1 or more"):
        open_model(str(ck))


def test_a_zero_window_that_is_switched_off_still_loads(tiny_models):
    """Qwen2-MoE writes sliding_window 0 whenever use_sliding_window is false: full attention, as transformers."""
    from elasticmoe import LLM
    from elasticmoe.model import open_model

    ck = tiny_models["qwen2_moe"]
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["sliding_window"] == 0 and cfg["use_sliding_window"] is False
    assert set(open_model(str(ck)).spec.attention.sliding_window) == {None}
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "qwen2_moe")
