"""Where each routed expert's weights lie in a checkpoint: per-expert tensors, or rows of packed ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError

LAYER = re.compile(r"^(?P<root>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<rest>.+)$")
# experts.{e}.{gate_proj|w1}.weight  (Qwen / DeepSeek / OLMoE: gate/up/down; Mixtral: w1=gate, w3=up, w2=down)
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\."
                         r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]  (transformers' in-memory layout, GraniteMoe-like)
_PACKED = re.compile(r"^(?P<block>.+)\.(?:experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?|"
                     r"(?P<gproj>input_linear|output_linear|experts\.fc1|experts\.fc2)\.weight)$")  # fc1/2: Aria
# GPT-OSS: experts.{gate_up_proj|down_proj}_{bias|blocks|scales} (biases; MXFP4 weights and their scales)
_PACKED_EXTRA = re.compile(r"^(?P<block>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)_(?P<kind>bias|blocks|scales)$")
_PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


@dataclass(frozen=True)
class ExpertRef:
    """Where one (layer, expert)'s weights are: three per-expert tensors, or rows of two packed ones."""

    gate: str | None  # per-expert layout: [I, H]
    up: str | None  # [I, H]
    down: str  # per-expert [H, I]; packed: the [E, H, I] (or [E, I, H]) tensor
    gate_up: str | None = None  # packed: [E, 2I, H] (or [E, H, 2I]); MXFP4: the [E, 2I, H/32, 16] blocks
    index: int = 0  # row of the packed tensors
    gate_up_bias: str | None = None  # GPT-OSS: [E, 2I]
    down_bias: str | None = None  # [E, H]
    gate_up_scales: str | None = None  # MXFP4 scales [E, 2I, H/32]
    down_scales: str | None = None  # [E, H, I/32]


def expert_parts(ckpt: Checkpoint, root: str, num_layers: int, num_experts: int, mtp_layers: int
                 ) -> tuple[dict[tuple[int, int], dict[str, str]], dict[int, str]]:
    """(layer, expert) -> its tensors by part (gate / up / down, or gate_up_proj / down_proj and their biases and
    scales: a packed tensor is every expert's), from the names under `root`; and each MoE layer's block prefix.
    Layers past num_layers + mtp_layers (speculative-decoding layers) fail naming the tensor."""
    parts: dict[tuple[int, int], dict[str, str]] = {}
    blocks: dict[int, str] = {}
    for name in ckpt.names():
        m = LAYER.match(name)
        if not m or m.group("root") != root:
            continue
        layer = int(m.group("layer"))
        if layer >= num_layers:
            if layer >= num_layers + mtp_layers:
                raise CheckpointError(f"{ckpt.path}: {name!r} lies past the config's {num_layers} layers")
            continue
        if pm := _PER_EXPERT.match(name):
            parts.setdefault((layer, int(pm.group("e"))), {})[_PROJ[pm.group("proj")]] = name
            blocks[layer] = pm.group("block") + "."
        elif px := _PACKED_EXTRA.match(name):
            key = {"blocks": px.group("proj"), "bias": px.group("proj") + "_bias",
                   "scales": px.group("proj") + "_scales"}[px.group("kind")]
            for e in range(num_experts):
                parts.setdefault((layer, e), {})[key] = name
            blocks[layer] = px.group("block") + "."
        elif (pk := _PACKED.match(name)) and pk.group("proj") and len(ckpt.shape(name)) != 3:
            raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} is {list(ckpt.shape(name))}, but "
                                  f"packed experts are [experts, out, in] (or [experts, in, out]): 3 dims")
        elif (pk := _PACKED.match(name)) and len(ckpt.shape(name)) == 3:
            proj = pk.group("proj") or ("gate_up_proj" if pk.group("gproj") in ("input_linear", "experts.fc1")
                                        else "down_proj")
            for e in range(num_experts):
                parts.setdefault((layer, e), {})[proj] = name
            blocks[layer] = pk.group("block") + "."
    return parts, blocks


def expert_ref(path: Path, layer: int, e: int, p: dict[str, str], extras_ok: bool, model_type: str) -> ExpertRef:
    """Expert e of the layer from its parts (expert_parts), which check_experts found complete; biases and MXFP4
    scales fail naming them unless `extras_ok` (GPT-OSS's experts)."""
    extra = sorted(p[k] for k in p if k.endswith(("_bias", "_scales")))
    if extra and not extras_ok:
        raise CheckpointError(f"{path}: expert biases / MXFP4 scales {extra[:2]} are only "
                              f"understood for GPT-OSS, not model_type {model_type!r}")
    if "gate_up_proj" in p:
        if "down_proj" not in p:
            raise CheckpointError(f"{path}: layer {layer} has packed gate_up_proj but no down_proj")
        return ExpertRef(None, None, p["down_proj"], p["gate_up_proj"], e, p.get("gate_up_proj_bias"),
                         p.get("down_proj_bias"), p.get("gate_up_proj_scales"), p.get("down_proj_scales"))
    if "down_proj" in p:  # else all three there (check_experts)
        raise CheckpointError(f"{path}: layer {layer} has packed down_proj but no gate_up_proj")
    return ExpertRef(p["gate"], p["up"], p["down"])
