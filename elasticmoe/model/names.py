"""Where each weight lives in a checkpoint: per-expert or packed expert tensors, routers, shared experts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError

_LAYER = re.compile(r"^(?P<root>(?:.*\.)?layers)\.(?P<layer>\d+)\.(?P<rest>.+)$")
# experts.{e}.{gate_proj|w1}.weight  (Qwen / DeepSeek / OLMoE: gate/up/down; Mixtral: w1=gate, w3=up, w2=down)
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# experts.gate_up_proj [E, 2I, H] + experts.down_proj [E, H, I]  (transformers' in-memory layout, GraniteMoe-like)
_PACKED = re.compile(r"^(?P<block>.+)\.(?:experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?|"
                     r"(?P<gproj>input_linear|output_linear)\.weight)$")
_PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_ROUTERS = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight")
_SHARED = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class ExpertRef:
    """Where one (layer, expert)'s weights are: three per-expert tensors, or rows of two packed ones."""

    gate: str | None  # per-expert layout: [I, H]
    up: str | None  # [I, H]
    down: str  # per-expert [H, I]; packed: the [E, H, I] (or [E, I, H]) tensor
    gate_up: str | None = None  # packed: [E, 2I, H] (or [E, H, 2I])
    index: int = 0  # row of the packed tensors


@dataclass(frozen=True)
class LayerNames:
    """Non-expert weights of one decoder layer, by role."""

    prefix: str  # "model.layers.3."
    block: str | None  # MoE block prefix ("model.layers.3.mlp."), None for a dense layer
    router: str | None
    router_bias: str | None  # e_score_correction_bias
    shared: tuple[str, str, str] | None  # shared expert gate/up/down weights
    shared_gate: str | None  # sigmoid gate of the shared expert (Qwen2-MoE)
    dense: tuple[str, str, str] | None  # dense MLP gate/up/down (dense layers)


class WeightNames:
    """Indexes a checkpoint's tensor names once: layer prefixes, MoE blocks and every expert's tensors."""

    def __init__(self, ckpt: Checkpoint, num_layers: int, num_experts: int):
        self.ckpt = ckpt
        self.root = self._find_root(ckpt)
        self.experts: dict[tuple[int, int], ExpertRef] = {}
        self.blocks: dict[int, str] = {}
        self._index_experts(num_experts)
        self.layers = [self._layer(i) for i in range(num_layers)]
        self.packed = any(r.gate_up is not None for r in self.experts.values())

    @staticmethod
    def _find_root(ckpt: Checkpoint) -> str:
        for name in ckpt.names():
            m = _LAYER.match(name)
            if m:
                return m.group("root")
        raise CheckpointError(f"{ckpt.path}: no tensors named '...layers.<i>...' in the checkpoint")

    def _index_experts(self, num_experts: int) -> None:
        parts: dict[tuple[int, int], dict[str, str]] = {}
        for name in self.ckpt.names():
            m = _LAYER.match(name)
            if not m or m.group("root") != self.root:
                continue
            layer = int(m.group("layer"))
            if pm := _PER_EXPERT.match(name):
                parts.setdefault((layer, int(pm.group("e"))), {})[_PROJ[pm.group("proj")]] = name
                self.blocks[layer] = pm.group("block") + "."
            elif pk := _PACKED.match(name):
                proj = pk.group("proj") or ("gate_up_proj" if pk.group("gproj") == "input_linear" else "down_proj")
                for e in range(num_experts):
                    parts.setdefault((layer, e), {})[proj] = name
                self.blocks[layer] = pk.group("block") + "."
        for (layer, e), p in parts.items():
            if "gate_up_proj" in p:
                if "down_proj" not in p:
                    raise CheckpointError(f"{self.ckpt.path}: layer {layer} has packed gate_up_proj but no down_proj")
                self.experts[(layer, e)] = ExpertRef(None, None, p["down_proj"], p["gate_up_proj"], e)
            else:
                missing = {"gate", "up", "down"} - set(p)
                if missing:
                    raise CheckpointError(
                        f"{self.ckpt.path}: expert {e} of layer {layer} lacks its {sorted(missing)} weight(s)")
                self.experts[(layer, e)] = ExpertRef(p["gate"], p["up"], p["down"])

    def _first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.ckpt), None)

    def _mlp(self, prefix: str) -> tuple[str, str, str] | None:
        for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            names = (f"{prefix}{gate}.weight", f"{prefix}{up}.weight", f"{prefix}{down}.weight")
            if all(n in self.ckpt for n in names):
                return names
        return None

    def _layer(self, i: int) -> LayerNames:
        prefix = f"{self.root}.{i}."
        block = self.blocks.get(i)
        if block is None:
            dense = self._mlp(prefix + "mlp.") or self._mlp(prefix + "feed_forward.")
            return LayerNames(prefix, None, None, None, None, None, dense)
        router = self._first(*(block + r for r in _ROUTERS))
        if router is None:
            raise CheckpointError(f"{self.ckpt.path}: MoE layer {i} ({block}) has no router weight ({block}gate.weight)")
        bias = self._first(block + "gate.e_score_correction_bias", block + "e_score_correction_bias",
                           block + "router.e_score_correction_bias", block + "expert_bias")
        shared = next((s for s in (self._mlp(f"{block}{n}.") for n in _SHARED) if s), None)
        shared_gate = self._first(block + "shared_expert_gate.weight")
        return LayerNames(prefix, block, router, bias, shared, shared_gate, None)

    def expert(self, layer: int, expert: int) -> ExpertRef:
        ref = self.experts.get((layer, expert))
        if ref is None:
            raise CheckpointError(f"{self.ckpt.path}: no weights for expert {expert} of layer {layer}")
        return ref
