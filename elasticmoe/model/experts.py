"""The expert half: a set of (layer, expert) weights, loaded lazily from the checkpoint, run with fused_moe."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from elasticmoe.kernels import fused_moe, warmup_moe
from elasticmoe.model import expert_math
from elasticmoe.model.checkpoint import Checkpoint
from elasticmoe.model.names import WeightNames
from elasticmoe.progress import LoadProgress
from elasticmoe.model.spec import ModelSpec

COMBINE_DTYPE = torch.float64  # experts' weighted sums: exact enough to be independent of the shard split


def write_expert(ckpt: Checkpoint, names: WeightNames, layer: int, expert: int, rows: tuple[torch.Tensor, ...]
                 ) -> None:
    """Read one expert's weights into its rows of a layer's storage: w13 [2I, H] (gate rows then up rows),
    w2 [H, I] (GPT-OSS: also b13 [2I], b2 [H], see model.expert_math), in the rows' dtype and device.

    Weights stored in the rows' dtype and layout are read from the file straight into them (CPU); others
    pass through one expert-sized temporary."""
    ref, spec = names.expert(layer, expert), names.spec
    if spec.moe.expert_act != "silu":
        for dst, t in zip(rows, expert_math.read_swiglu_expert(ckpt, ref, spec.hidden_size, spec.moe.intermediate_size)):
            dst.copy_(t)
        return
    w13, w2 = rows[0], rows[1]
    if ref.gate_up is None:
        inter = w13.shape[0] // 2
        ckpt.read_into(ref.gate, w13[:inter])
        ckpt.read_into(ref.up, w13[inter:])
        ckpt.read_into(ref.down, w2)
        return
    gate_up, down = ckpt.shape(ref.gate_up)[1:], ckpt.shape(ref.down)[1:]
    ckpt.read_into(ref.gate_up, w13 if gate_up == tuple(w13.shape) else w13.t(), index=ref.index)  # or [H, 2I]
    ckpt.read_into(ref.down, w2 if down == tuple(w2.shape) else w2.t(), index=ref.index)  # or [I, H]


@dataclass(frozen=True)
class LayerExperts:
    """The experts of one layer held here, stacked. Replaced whole (never mutated) on load/drop."""

    w13: torch.Tensor  # [E_local, 2I, H]
    w2: torch.Tensor  # [E_local, H, I]
    global_ids: tuple[int, ...]  # local index -> global expert id
    to_local: torch.Tensor  # [E + 1] global id -> local index, -1 when absent; entry E maps id -1 to -1
    b13: torch.Tensor | None = None  # [E_local, 2I] expert biases (GPT-OSS), else None
    b2: torch.Tensor | None = None  # [E_local, H]


class ExpertStore:
    """Holds any set of (layer, expert) weights and runs a layer's experts for a batch of tokens."""

    def __init__(self, ckpt: Checkpoint, names: WeightNames, spec: ModelSpec, dtype: torch.dtype,
                 device: torch.device, backend: str = "auto"):
        self.ckpt, self.names, self.spec = ckpt, names, spec
        self.dtype, self.device, self.backend = dtype, device, backend
        self.layers: dict[int, LayerExperts] = {}
        self._lock = threading.Lock()  # serialises load/drop; forward reads a snapshot
        self.tokens_served: dict[tuple[int, int], int] = {}
        self.compute_s = 0.0

    def held(self) -> list[tuple[int, int]]:
        return sorted((l, e) for l, le in self.layers.items() for e in le.global_ids)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for le in self.layers.values()
                   for t in (le.w13, le.w2, le.b13, le.b2) if t is not None)

    def load(self, pairs: Iterable[tuple[int, int]]) -> int:
        """Load (layer, expert) pairs not yet held; returns the bytes read. Safe while forward() runs.

        Layer by layer: a layer's new storage is allocated once, at its final size, and each expert is read
        into its rows, so loading needs no more than the weights held plus one layer's old storage (kept
        until in-flight forward() calls that use it finish) and one expert-sized temporary."""
        with self._lock:
            by_layer: dict[int, set[int]] = {}
            for layer, e in pairs:
                if not (0 <= e < self.spec.moe.num_experts) or not self.spec.moe.sparse_layers[layer]:
                    raise ValueError(f"expert ({layer}, {e}) does not exist in this model")
                if layer not in self.layers or e not in self.layers[layer].global_ids:
                    by_layer.setdefault(layer, set()).add(e)
            before = self.ckpt.bytes_read
            todo = sum(len(es) for es in by_layer.values())
            with LoadProgress("loading experts", todo, lambda: self.ckpt.bytes_read) as progress:
                for layer, experts in sorted(by_layer.items()):
                    self._load_layer(layer, sorted(experts), progress)
            return self.ckpt.bytes_read - before

    def _load_layer(self, layer: int, experts: list[int], progress: LoadProgress) -> None:
        old = self.layers.get(layer)
        held = old.global_ids if old is not None else ()
        n, inter, hidden = len(held) + len(experts), self.spec.moe.intermediate_size, self.spec.hidden_size
        shapes = [(n, 2 * inter, hidden), (n, hidden, inter)]  # w13, w2
        if self.spec.moe.expert_act != "silu":
            shapes += [(n, 2 * inter), (n, hidden)]  # b13, b2
        parts = [torch.empty(s, dtype=self.dtype, device=self.device) for s in shapes]
        if old is not None:
            for dst, src in zip(parts, (old.w13, old.w2, old.b13, old.b2)):
                dst[: len(held)].copy_(src)
        for j, e in enumerate(experts, start=len(held)):
            write_expert(self.ckpt, self.names, layer, e, tuple(p[j] for p in parts))
            progress.step()
        self.layers[layer] = self._stack(layer, list(held) + experts, *parts)

    def drop(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Forget (layer, expert) pairs; in-flight forward() calls keep the snapshot they started with."""
        with self._lock:
            for layer, e in pairs:
                le = self.layers.get(layer)
                if le is None or e not in le.global_ids:
                    continue
                keep = [i for i, g in enumerate(le.global_ids) if g != e]
                if not keep:
                    del self.layers[layer]
                    continue
                idx = torch.tensor(keep, device=self.device)
                biases = [b.index_select(0, idx) for b in (le.b13, le.b2) if b is not None]
                self.layers[layer] = self._stack(layer, [le.global_ids[i] for i in keep],
                                                 le.w13.index_select(0, idx), le.w2.index_select(0, idx), *biases)

    def _stack(self, layer: int, ids: list[int], w13: torch.Tensor, w2: torch.Tensor,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> LayerExperts:
        to_local = torch.full((self.spec.moe.num_experts + 1,), -1, dtype=torch.int64, device=self.device)
        to_local[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        le = LayerExperts(w13.contiguous(), w2.contiguous(), tuple(ids), to_local, b13, b2)
        if self.spec.moe.expert_act == "silu":
            warmup_moe(le.w13, le.w2, self.spec.moe.top_k, self.backend, self.dtype)  # compile Triton kernels now
        return le

    @staticmethod
    def routed(topk_ids: torch.Tensor) -> dict[int, int]:
        """Tokens per global expert id in topk_ids [T, k] (ids of -1 ignored)."""
        ids, counts = topk_ids[topk_ids >= 0].unique(return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def snapshot(self, layer: int) -> LayerExperts | None:
        """The layer's experts as held now; one call uses one snapshot for its check and its compute."""
        return self.layers.get(layer)

    def missing(self, layer: int, routed: dict[int, int], snap: LayerExperts | None = None) -> list[int]:
        """The expert ids of `routed` (see `routed`) that are not held here (in `snap`, if given)."""
        le = snap if snap is not None else self.layers.get(layer)
        return sorted(set(routed) - set(le.global_ids if le else ()))

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                snap: LayerExperts | None = None) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k] global ids (-1 = not here), topk_weights [T, k] -> [T, H] float64.

        Every id >= 0 must be held (see `missing`; pass the same `snap` to both); its contribution is weighted
        and summed per token in float64, so partial sums from any split of the experts over shards add up to
        the same bits as one sum over all of them (COMBINE_DTYPE; the caller rounds to the model's dtype).
        """
        le = snap if snap is not None else self.layers.get(layer)
        if le is None or hidden.shape[0] == 0:
            return torch.zeros_like(hidden, dtype=COMBINE_DTYPE)
        t0 = time.perf_counter()
        local = le.to_local[topk_ids.long()]  # [T, k]; index E (= -1 wrapped) maps to -1
        if self.spec.moe.input_scaled:  # Llama 4: weights scale the experts' inputs (model.expert_math)
            out = expert_math.input_scaled_moe(hidden, le.w13, le.w2, local, topk_weights, COMBINE_DTYPE)
        elif self.spec.moe.expert_act == "silu":
            out = fused_moe(hidden, le.w13, le.w2, local, topk_weights, backend=self.backend, out_dtype=COMBINE_DTYPE)
        else:  # GPT-OSS experts: torch (model.expert_math)
            out = expert_math.swiglu_moe(hidden, le.w13, le.w2, le.b13, le.b2, local, topk_weights, self.spec.moe,
                                         COMBINE_DTYPE)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # time the kernels, not their launches
        self.compute_s += time.perf_counter() - t0
        return out

    def count(self, layer: int, routed: dict[int, int]) -> None:
        """Add a batch's tokens per expert (see `routed`) to tokens_served (for stats)."""
        for e, c in routed.items():
            self.tokens_served[(layer, e)] = self.tokens_served.get((layer, e), 0) + c
