"""A layer's expert weights as ExpertStore holds them: one expert read into its rows, their storage, the stack."""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass

import torch

from elasticmoe.model import expert_math
from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.names import WeightNames

_PARTS = ("w13", "w2", "b13", "b2", "w13_scale", "w2_scale")  # LayerExperts' per-expert stacked fields


def write_expert(ckpt: Checkpoint, names: WeightNames, layer: int, expert: int, rows: dict[str, torch.Tensor]
                 ) -> None:
    """Read one expert's weights into its rows of a layer's storage (see ExpertStore.part_shapes): w13 [2I, H]
    (gate rows then up rows), w2 [H, I], and GPT-OSS's b13 [2I], b2 [H] (model.expert_math), or block-FP8's
    w13_scale, w2_scale, in the rows' dtype and device.

    Weights stored in the rows' dtype go from the file straight into them (CPU); others pass through one
    expert-sized temporary."""
    ref, spec = names.expert(layer, expert), names.spec
    if spec.moe.expert_act == "swiglu_clamped":
        weights = expert_math.read_swiglu_expert(ckpt, ref, spec.hidden_size, spec.moe.intermediate_size)
        for dst, t in zip((rows[k] for k in ("w13", "w2", "b13", "b2")), weights):
            dst.copy_(t)
        return
    w13, w2 = rows["w13"], rows["w2"]
    if ref.gate_up is None:
        inter, half = w13.shape[0] // 2, (rows["w13_scale"].shape[0] // 2 if "w13_scale" in rows else 0)
        todo = [(ref.gate, w13[:inter], 0, half), (ref.up, w13[inter:], half, 2 * half), (ref.down, w2, 0, None)]
        for i, (name, dst, lo, hi) in enumerate(todo):
            ckpt.read_into(name, dst)
            if "w13_scale" in rows:  # FP8 kept: gate's and up's scales side by side ("split" rows, kernels.fp8)
                ckpt.read_into(_scale(ckpt, name), rows["w13_scale"][lo:hi] if i < 2 else rows["w2_scale"])
        return
    for name, dst, scale in ((ref.gate_up, w13, "w13_scale"), (ref.down, w2, "w2_scale")):
        transposed = _stored_in_out(ckpt.shape(name)[1:], tuple(dst.shape), spec.moe.experts_in_out)
        ckpt.read_into(name, dst.t() if transposed else dst, index=ref.index)  # [H, 2I] / [I, H] transposed
        if scale in rows:
            ckpt.read_into(_scale(ckpt, name), rows[scale], index=ref.index)


def _stored_in_out(stored: tuple[int, ...], want: tuple[int, int], in_out: bool) -> bool:
    """Whether one expert's row of a packed tensor is stored [in, out] (transposed from `want` [out, in]): by its
    shape, or when that is square (H = 2I for gate_up, H = I for down) by the family's layout. A row of neither
    shape is read as stored, so the error names the [out, in] shape the config wants."""
    if stored[0] == stored[1]:
        return in_out
    return tuple(stored) == tuple(reversed(want))


def _scale(ckpt: Checkpoint, name: str) -> str:
    scale = ckpt.scale_of(name)
    if scale is None:
        raise CheckpointError(f"{ckpt.path}: expert weight {name!r} is not FP8 (no weight_scale_inv), but the other "
                              "experts are kept in FP8")
    return scale


def storage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor for a layer's stacked weights. On the CPU it has an anonymous mapping of its own, unmapped when
    the last tensor using it goes (a drop, or the in-flight call that still held the old layer): malloc would serve
    one under its mmap threshold, which glibc raises to the largest block freed (up to 32 MiB), from its heaps, and
    keep it there once freed, so churn of small layers left the process at 1.2-3x the experts it held."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero pages, touched on first write
    except OSError as e:  # ENOMEM: more than the host commits to (not a file's fault: a MemoryError, as torch's)
        if e.errno != errno.ENOMEM:
            raise
        raise MemoryError(f"cannot allocate {nbytes} bytes on the CPU: {e.strerror}") from None
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one layer held here, stacked. Replaced whole (never mutated) on load/drop."""

    w13: torch.Tensor  # [E_local, 2I, H]
    w2: torch.Tensor  # [E_local, H, I]
    global_ids: tuple[int, ...]  # local index -> global expert id
    to_local: torch.Tensor  # [E + 1] global id -> local index, -1 when absent; entry E maps id -1 to -1
    b13: torch.Tensor | None = None  # [E_local, 2I] expert biases (GPT-OSS), else None
    b2: torch.Tensor | None = None  # [E_local, H]
    w13_scale: torch.Tensor | None = None  # block-FP8 kept (w13, w2 float8_e4m3fn): [E_local, rows, ceil(H/bk)]
    w2_scale: torch.Tensor | None = None  # [E_local, ceil(H/bn), ceil(I/bk)] float32 (see kernels.fp8)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stacked per-expert tensors by field name (w13, w2 and whichever of the others are set)."""
        return {f: getattr(self, f) for f in _PARTS if getattr(self, f) is not None}
