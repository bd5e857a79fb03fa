"""Step-3.7's per-layer SwiGLU clamps (swiglu_limits, swiglu_limits_shared): they clip in the tested checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from elasticmoe.kernels import ExpertAct, fused_moe
from elasticmoe.model.layers import gated_mlp
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 21]


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory):
    return make_family_checkpoint("step3p7", tmp_path_factory.mktemp("step") / "s", case=MORE_CASES["step3p7"])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT_IDS])).logits[0].float()  # [T, V]


def test_step3p7_case_clamps_change_transformers_logits(step_dir):
    """The MORE_CASES checkpoint (whose logits the engine matches) has layer 2's routed experts and layer 1's shared
    expert clamped at 0.05: lifting either clamp in transformers moves the logits, so both clip there."""
    model = transformers.Step3p7ForConditionalGeneration.from_pretrained(str(step_dir), dtype=torch.float32).eval()
    layers = model.model.language_model.layers
    assert layers[2].mlp.experts.limit == pytest.approx(0.05) and layers[1].mlp.shared_experts.limit == 0.05
    assert math.isinf(layers[1].mlp.experts.limit) and math.isinf(layers[2].mlp.shared_experts.limit)
    clamped = _logits(model)
    for module in (layers[2].mlp.experts, layers[1].mlp.shared_experts):
        module.limit = float("inf")
        lifted = _logits(model)
        module.limit = 0.05
        assert (lifted - clamped).abs().max() > 1e-3 * clamped.abs().max()


def test_engine_clamps_clip_experts_and_mlps():
    """fused_moe with ExpertAct("silu", L) and layers.gated_mlp with a limit L: silu(gate) <= L and up in [-L, L],
    as transformers' Step-3.7 experts and MLPs; a limit of 0 clamps nothing; the clamp changes the values here."""
    gen = torch.Generator().manual_seed(0)
    x, w13, w2 = (torch.randn(s, generator=gen) for s in ((5, 16), (3, 24, 16), (3, 16, 12)))  # [T, H], [E, 2I, H]
    ids, weights = torch.tensor([[0, 2]] * 5), torch.full((5, 2), 0.5)  # [T, k]
    gate, up = (x @ w13[0].t()).chunk(2, dim=-1)  # [T, I]
    limit = 0.1
    want = (torch.nn.functional.silu(gate).clamp(max=limit) * up.clamp(-limit, limit)) @ w2[0].t()  # [T, H]
    mlp = {"gate": w13[0][:12], "up": w13[0][12:], "down": w2[0]}
    assert torch.allclose(gated_mlp(x, mlp, "silu", limit), want, atol=1e-5)
    assert (gated_mlp(x, mlp, "silu") - want).abs().max() > 0.1
    assert torch.allclose(gated_mlp(x, mlp, "silu", 0.0), gated_mlp(x, mlp, "silu"))
    clamped = fused_moe(x, w13, w2, ids, weights, act=ExpertAct("silu", limit))  # [T, H]
    assert (clamped - fused_moe(x, w13, w2, ids, weights)).abs().max() > 0.1
    assert torch.allclose(fused_moe(x, w13, w2, ids[:, :1], weights[:, :1], act=ExpertAct("silu", limit)),
                          0.5 * want, atol=1e-5)
