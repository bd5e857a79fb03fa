"""Top-k routing margins of a transformers MoE model's routers: how far each token is from a routing flip."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def moe_routers(model: PreTrainedModel) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router module) of every sparse layer; the router is ``layer.mlp.gate``."""
    out = []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate"):
            out.append((i, layer.mlp.gate))
    return out


@torch.no_grad()
def router_margins(model: PreTrainedModel, input_ids: torch.Tensor) -> dict[int, float]:
    """Per sparse layer, the smallest top-k decision margin over the tokens of ``input_ids`` (fp32).

    Softmax routers: ``log p[k-1] - log p[k]`` of the sorted probabilities (the router-logit gap; a
    gap in probability units shrinks as routers get sharper). DeepSeek-V3: the gap of
    ``sigmoid(logits) + e_score_correction_bias`` inside the kept groups, and the group-selection gap.
    """
    inputs: dict[int, torch.Tensor] = {}
    hooks = [gate.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, gate in moe_routers(model)]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    k = model.config.num_experts_per_tok
    margins = {}
    for i, gate in moe_routers(model):
        logits = inputs[i].reshape(-1, gate.weight.shape[1]).float() @ gate.weight.float().T
        margins[i] = _margin(gate, logits, k)
    return margins


def _gap(desc: torch.Tensor, k: int) -> float:
    """min over rows of ``desc[:, k-1] - desc[:, k]`` (rows sorted descending); inf if nothing is cut."""
    if k >= desc.shape[1]:
        return float("inf")
    return (desc[:, k - 1] - desc[:, k]).min().item()


def _margin(gate: torch.nn.Module, logits: torch.Tensor, k: int) -> float:
    """Smallest top-k selection gap of one router over a batch of router logits [T, E]."""
    bias = getattr(gate, "e_score_correction_bias", None)
    if bias is None:
        return _gap(logits.log_softmax(-1).sort(-1, descending=True).values, k)
    scores = logits.sigmoid() + bias.float()
    t, e = scores.shape
    per_group = e // gate.num_group
    gscore = scores.view(t, gate.num_group, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(gate.topk_group, -1).indices, True)
    masked = scores.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    group_gap = _gap(gscore.sort(-1, descending=True).values, gate.topk_group)
    return min(group_gap, _gap(masked.sort(-1, descending=True).values, k))
