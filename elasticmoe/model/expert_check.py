"""Every routed expert config.json gives an MoE layer is in the checkpoint, at the sizes it gives, checked when it is
opened: per-expert gate/up/down tensors of each expert, or packed tensors of one row per expert. Only the safetensors
headers and the index are read (no tensor data), so that a checkpoint short of an expert, or of other sizes, fails at
open, naming the file and the tensor, not later in each load of the shards that read the expert."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.quant import FP8_DTYPES, QuantError

if TYPE_CHECKING:
    from elasticmoe.model.expert_names import ExpertRef

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts\.)\d+\.(?P<proj>\w+)\.weight$")
_PROJS = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}  # Mixtral: w1, w3, w2
_PACKED = ("gate_up_proj", "down_proj")  # the packed roles (WeightNames' parts), biases and scales beside them
_FLOATS = ("F64", "F32", "F16", "BF16")  # the floating dtypes a weight can be read from (FP8 aside)


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


def check_expert_shapes(ckpt: Checkpoint, refs: dict[tuple[int, int], ExpertRef], hidden: int, inter: int) -> None:
    """Each routed expert's weights in `refs` ((layer, expert) -> where they are) at config.json's hidden size H and
    expert intermediate size I, as ExpertStore reads them: per-expert gate and up [I, H], down [H, I]; a packed row
    [2I, H] and [H, I], or either stored [in, out]. Without it a shard opened such a checkpoint and only each of its
    loads failed (transformers refuses it: `ignore_mismatched_sizes`). Gated-SiLU experts only: GPT-OSS's (biases,
    MXFP4 blocks) are checked as they are read (model.expert_math)."""
    rows = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter), "gate_up": (2 * inter, hidden)}
    seen: set[str] = set()  # a packed tensor is every expert's of its layer: checked once
    for _, ref in sorted(refs.items()):
        packed = ref.gate_up is not None
        for role in ("gate_up", "down") if packed else ("gate", "up", "down"):
            name, want = getattr(ref, role), rows[role]
            if name in seen:
                continue
            seen.add(name)
            shape = ckpt.shape(name)
            got = shape[1:] if packed else shape
            if got != want and not (packed and got == want[::-1]):
                what = f"{list(shape)}: rows of {list(got)}" if packed else list(shape)
                wanted = f"{list(want)} (or {list(want[::-1])})" if packed else list(want)
                raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} is {what}, but config.json makes it {wanted} "
                                      f"(hidden size {hidden}, expert intermediate size {inter}; transformers refuses "
                                      "it)")


def check_expert_dtypes(ckpt: Checkpoint, refs: dict[tuple[int, int], ExpertRef]) -> None:
    """Each routed expert tensor in `refs` stored in a dtype its read can use: weights and biases floating point
    (F8_E4M3 / F8_E5M2 only under config.json's quantization_config 'fp8', which scales them), MXFP4 blocks and
    scales U8. Without it a shard opened a checkpoint with integers where a weight is, or bare FP8, and only each of
    its loads failed (Checkpoint.read_weight, expert_math). Only the headers are read."""
    seen: set[str] = set()  # a packed tensor is every expert's of its layer: checked once
    for _, ref in sorted(refs.items()):
        mxfp4 = {ref.gate_up: ref.gate_up_scales, ref.down: ref.down_scales}
        for name in (ref.gate, ref.up, ref.down, ref.gate_up, ref.gate_up_bias, ref.down_bias, *mxfp4.values()):
            if name is None or name in seen:
                continue
            seen.add(name)
            dtype, file = ckpt.dtype(name), ckpt.file_of(name)
            if mxfp4.get(name) is not None or name in (ref.gate_up_scales, ref.down_scales):
                if dtype != "U8":  # bytes: a signed or wider reading gives other codes and exponents
                    raise CheckpointError(f"{file}: MXFP4 {name!r} is {dtype}, want U8 (E2M1 code / E8M0 exponent "
                                          "bytes)")
            elif dtype in FP8_DTYPES and ckpt.quant.method != "fp8":
                raise QuantError(f"{file}: {name!r} is {dtype} but config.json has no quantization_config 'fp8' to "
                                 "scale it (its values would be meaningless)")
            elif dtype not in _FLOATS and dtype not in FP8_DTYPES:
                raise CheckpointError(f"{file}: {name!r} is stored as {dtype}, but it is a weight (floating point)")


def _where_missing(ckpt: Checkpoint, sibling: str) -> Path:
    """Where a missing tensor would be listed: the index of a sharded checkpoint, else the file holding the
    layer's other experts."""
    return ckpt.index_file or ckpt.file_of(sibling)
