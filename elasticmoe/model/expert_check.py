"""Every routed expert config.json gives an MoE layer is in the checkpoint, checked when it is opened: per-expert
gate/up/down tensors of each expert, or packed tensors of one row per expert. Only the safetensors headers and the
index are read (no tensor data), so that a checkpoint short of an expert fails at open, naming the file and the
tensor, not later in the one shard that loads the expert."""

from __future__ import annotations

import re
from pathlib import Path

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts\.)\d+\.(?P<proj>\w+)\.weight$")
_PROJS = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}  # Mixtral: w1, w3, w2
_PACKED = ("gate_up_proj", "down_proj")  # the packed roles (WeightNames' parts), biases and scales beside them


def check_experts(ckpt: Checkpoint, parts: dict[tuple[int, int], dict[str, str]], num_experts: int) -> None:
    """`parts`: (layer, expert) -> role -> tensor name, as WeightNames found them. Each layer that holds experts
    holds all `num_experts`: a packed tensor has one row per expert, a per-expert expert all three weights."""
    layers: dict[int, dict[int, dict[str, str]]] = {}  # layer -> expert -> role -> name
    for (layer, e), p in parts.items():
        layers.setdefault(layer, {})[e] = p
    for layer, experts in sorted(layers.items()):
        some = next(iter(experts.values()))
        if any(role.startswith(_PACKED) for role in some):  # every expert names the same packed tensors
            for name in sorted(set(some.values())):
                shape = ckpt.shape(name)
                if shape[0] != num_experts:
                    raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} {list(shape)} holds {shape[0]} experts, but "
                                          f"config.json gives layer {layer} {num_experts}")
            continue
        sibling = next(iter(some.values()))
        m = _PER_EXPERT.match(sibling)
        if m is None:  # not a per-expert name (a layout WeightNames reports itself)
            continue
        style = 1 if m.group("proj") in ("w1", "w2", "w3") else 0
        for e in range(num_experts):
            have = experts.get(e, {})
            for role in ("gate", "up", "down"):
                if role not in have:
                    name = f"{m.group('prefix')}{e}.{_PROJS[role][style]}.weight"
                    raise CheckpointError(f"{_where_missing(ckpt, sibling)}: no tensor {name!r} (the {role} weight of "
                                          f"expert {e} of layer {layer}; config.json gives it {num_experts} experts)")


def _where_missing(ckpt: Checkpoint, sibling: str) -> Path:
    """Where a missing tensor would be listed: the index of a sharded checkpoint, else the file holding the
    layer's other experts."""
    return ckpt.index_file or ckpt.file_of(sibling)
