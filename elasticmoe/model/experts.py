"""The expert half: a set of (layer, expert) weights, loaded lazily from the checkpoint, run with fused_moe."""

from __future__ import annotations

import threading
from typing import Callable, ContextManager, Iterable

import torch

from elasticmoe.kernels import fused_moe, resolve_backend, warmup_moe
from elasticmoe.kernels.fp8 import triton_runs_fp8
from elasticmoe.model import expert_math
from elasticmoe.model.checkpoint import Checkpoint
from elasticmoe.model.expert_stats import ServedCalls, StoreStats, routed_counts
from elasticmoe.model.expert_weights import LayerExperts, storage, write_expert
from elasticmoe.model.names import WeightNames
from elasticmoe.model.oom import out_of_memory, out_of_memory_says
from elasticmoe.progress import LoadProgress
from elasticmoe.model.spec import ModelSpec

COMBINE_DTYPE = torch.float64  # experts' weighted sums: exact enough to be independent of the shard split
_NOW = object()  # missing() / forward() without a snapshot: the layer as held now (None is a snapshot: none held)


class LoadStopped(Exception):
    """A load whose `stop` said its caller has gone (ExpertStore.load): taken back, as a failed load is."""


class ExpertStore:
    """Holds any set of (layer, expert) weights and runs a layer's experts for a batch of tokens."""

    def __init__(self, ckpt: Checkpoint, names: WeightNames, spec: ModelSpec, dtype: torch.dtype,
                 device: torch.device, backend: str = "auto", keep_fp8: bool | None = None):
        """dtype: the activations' (and dequantized weights') dtype. keep_fp8: hold block-FP8 experts as stored
        (float8_e4m3fn weights plus float32 scales, run by fused_moe's block-FP8 path); default: where the Triton
        backend runs them (CUDA, sm_89 or newer). Otherwise FP8 experts are dequantized to dtype on load."""
        self.ckpt, self.names, self.spec = ckpt, names, spec
        self.dtype, self.device, self.backend = dtype, device, backend
        q, moe = ckpt.quant, spec.moe
        fp8 = q.method == "fp8" and q.block is not None and moe.expert_act == "silu" and not moe.input_scaled
        if keep_fp8 and not fp8:
            raise ValueError(f"keep_fp8: {ckpt.path} has no block-FP8 gated-SiLU experts to keep")
        self.keep_fp8 = fp8 and triton_runs_fp8(device) and resolve_backend(backend, device, fp8=True) == "triton" \
            if keep_fp8 is None else keep_fp8
        self.block = q.block if self.keep_fp8 else None  # (bn, bk)
        # per-expert files hold gate and up scales apart ("split" rows); a packed gate_up_proj's cover both
        self.split_scales = not names.packed if self.keep_fp8 else None
        self.layers: dict[int, LayerExperts] = {}
        self._lock = threading.Lock()  # serialises load/drop; forward reads a snapshot
        self.served = ServedCalls()  # the calls served (count()): GetStats' tokens, calls, compute_us and busy_us
        self.acts = [expert_math.expert_act(moe, layer) for layer in range(len(moe.sparse_layers))]

    def held(self) -> list[tuple[int, int]]:
        return _held(list(self.layers.items()))  # list(): one atomic copy (a load or drop may change the dict)

    def weight_bytes(self) -> int:
        return _weight_bytes(list(self.layers.items()))

    def stats(self) -> StoreStats:
        """held and weight_bytes from one copy of the layers (a load publishing a layer between two looks made them
        disagree), and the counters of the calls served together."""
        layers = list(self.layers.items())
        return self.served.stats(_held(layers), _weight_bytes(layers))

    def computing(self) -> ContextManager[None]:
        """A call computing, for busy_us (ServedCalls.computing)."""
        return self.served.computing()

    def expert_bytes(self) -> int:
        """The bytes one expert's weights take as held here (part_shapes' dtypes: FP8 kept with its scales, biases)."""
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in self.part_shapes(1).values())

    def part_shapes(self, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each stacked tensor of a layer holding n experts."""
        inter, hidden = self.spec.moe.intermediate_size, self.spec.hidden_size
        if self.keep_fp8:
            (bn, bk), cdiv = self.block, lambda a, b: -(-a // b)
            rows13 = 2 * cdiv(inter, bn) if self.split_scales else cdiv(2 * inter, bn)
            return {"w13": ((n, 2 * inter, hidden), torch.float8_e4m3fn),
                    "w2": ((n, hidden, inter), torch.float8_e4m3fn),
                    "w13_scale": ((n, rows13, cdiv(hidden, bk)), torch.float32),
                    "w2_scale": ((n, cdiv(hidden, bn), cdiv(inter, bk)), torch.float32)}
        shapes = {"w13": ((n, 2 * inter, hidden), self.dtype), "w2": ((n, hidden, inter), self.dtype)}
        if self.spec.moe.expert_act == "swiglu_clamped":
            shapes.update(b13=((n, 2 * inter), self.dtype), b2=((n, hidden), self.dtype))
        return shapes

    def load(self, pairs: Iterable[tuple[int, int]], stop: Callable[[], bool] | None = None) -> int:
        """Load (layer, expert) pairs not yet held; returns the bytes read. Safe while forward() runs.

        Layer by layer: a layer's new storage is allocated once, at its final size, and each expert is read
        into its rows, so loading needs no more than the weights held plus one layer's old storage (kept
        until in-flight forward() calls that use it finish) and one expert-sized temporary.

        All or nothing: a load that fails (an expert the file cannot give, memory) takes back what it added to the
        layers it had done (calls meanwhile may have run those experts), so the store holds what it held before.
        `stop` is asked before each expert is read and once all are: true (the caller gone: no one would learn what
        the load did), it is taken back as a failed load is and raises LoadStopped. A read under way runs to its end."""
        with self._lock:
            by_layer: dict[int, set[int]] = {}
            for layer, e in pairs:
                sparse = self.spec.moe.sparse_layers
                if not (0 <= e < self.spec.moe.num_experts and 0 <= layer < len(sparse) and sparse[layer]):
                    raise ValueError(f"expert ({layer}, {e}) does not exist in this model")
                if layer not in self.layers or e not in self.layers[layer].global_ids:
                    by_layer.setdefault(layer, set()).add(e)
            before = self.ckpt.bytes_read
            todo = sum(len(es) for es in by_layer.values())
            done: dict[int, int] = {}  # layer loaded by this call -> the experts it held before
            stop = stop or (lambda: False)
            try:
                with LoadProgress("loading experts", todo, lambda: self.ckpt.bytes_read) as progress:
                    for layer, experts in sorted(by_layer.items()):
                        held = len(self.layers[layer].global_ids) if layer in self.layers else 0
                        self._load_layer(layer, sorted(experts), progress, stop)
                        done[layer] = held
                    if todo and stop():
                        raise LoadStopped(f"the load's caller left once its {todo} experts were read: taken back")
            except Exception as e:
                self._take_back(done, e)
                raise
            return self.ckpt.bytes_read - before

    def _take_back(self, done: dict[int, int], cause: Exception) -> None:
        """A failed load's undoing: each layer in `done` back to the experts it held before (its first ones: a load
        appends). A layer that held none is freed; the others are rebuilt, as a drop does (beside the layer's storage,
        as its load had the old one); one whose rebuild does not fit keeps the load's experts, and the error says so."""
        kept = []
        for layer, held in done.items():
            if held == 0:
                del self.layers[layer]
                continue
            try:
                self.layers[layer] = self._rebuilt(layer, list(range(held)))
            except Exception as e:  # noqa: BLE001 - out of memory (model.oom): the layer keeps the load's experts
                if not out_of_memory(e):
                    raise
                kept.append(layer)
        if kept:
            message = f"{cause} (layers {kept} keep the experts this load added to them: taking them back did not " \
                      "fit in memory)"
            try:  # the cause's type (the server maps it to its code), where it takes a message as its one argument
                error = type(cause)(message)
            except Exception:  # noqa: BLE001 - a type built otherwise
                error = RuntimeError(message)
            raise error from cause

    def _load_layer(self, layer: int, experts: list[int], progress: LoadProgress, stop: Callable[[], bool]) -> None:
        old = self.layers.get(layer)
        held = old.global_ids if old is not None else ()
        n = len(held) + len(experts)
        with out_of_memory_says(f"layer {layer}: {n} experts' weights do not fit in memory"):  # storage's, a GPU's
            parts = {k: storage(shape, dtype, self.device) for k, (shape, dtype) in self.part_shapes(n).items()}
        if old is not None:
            for k, src in old.parts().items():
                parts[k][: len(held)].copy_(src)
        for j, e in enumerate(experts, start=len(held)):
            if stop():  # this layer's new storage is not published: it goes with this frame
                raise LoadStopped(f"the load's caller left after {progress.done} of its {progress.items} experts "
                                  f"were read (before layer {layer}'s expert {e}): taken back")
            # torch's CPU allocator refusing a read's expert-sized temporary (a RuntimeError), a GPU's
            with out_of_memory_says(f"layer {layer}: expert {e} could not be read into the layer's new storage (the "
                                    "layer is left as it was)"):
                write_expert(self.ckpt, self.names, layer, e, {k: p[j] for k, p in parts.items()})
            progress.step()
        self.layers[layer] = self._stack(layer, list(held) + experts, parts)

    def drop(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Forget (layer, expert) pairs; in-flight forward() calls keep the snapshot they started with. Layers left
        with none go first (their memory freed, nothing copied); then each other layer is rebuilt once, whatever
        number of its experts go (a rebuild copies the layer's remaining weights into new storage).

        A rebuild that does not fit in memory leaves its layer as it was (all its experts held and served) and
        the other layers dropped as asked; then MemoryError (torch.OutOfMemoryError on a GPU, RuntimeError from
        torch's CPU allocator: model.oom) names the layers kept whole and the bytes their rebuilds wanted."""
        gone: dict[int, set[int]] = {}
        for layer, e in pairs:
            gone.setdefault(layer, set()).add(e)
        with self._lock:
            rebuild: dict[int, list[int]] = {}  # layer -> local indices of the experts it keeps
            done: list[int] = []  # layers changed as asked
            for layer, experts in gone.items():  # no reference to a layer kept here: an emptied one is freed now
                ids = self.layers[layer].global_ids if layer in self.layers else ()
                keep = [i for i, g in enumerate(ids) if g not in experts]
                if len(keep) == len(ids):  # none of it held
                    continue
                if keep:
                    rebuild[layer] = keep
                else:
                    del self.layers[layer]
                    done.append(layer)
            failed: list[Exception] = []
            for layer, keep in sorted(rebuild.items()):
                try:
                    self.layers[layer] = self._rebuilt(layer, keep)
                    done.append(layer)
                except Exception as e:  # noqa: BLE001 - out of memory (model.oom) keeps the layer; others raise
                    if not out_of_memory(e):
                        raise
                    failed.append(e)
            if failed:
                rest = f" (layers {sorted(done)} dropped as asked)" if done else ""
                raise type(failed[0])("; ".join(map(str, failed)) + rest)

    def _rebuilt(self, layer: int, keep: list[int]) -> LayerExperts:
        """The layer holding only its experts at local indices `keep`, in new storage (the old one is untouched)."""
        le = self.layers[layer]
        nbytes = sum(len(keep) * t[0].numel() * t.element_size() for t in le.parts().values())
        with out_of_memory_says(f"layer {layer}: the {len(keep)} experts it keeps ({nbytes} bytes) do not fit in "
                                f"memory beside the {len(le.global_ids)} it holds, which it keeps holding"):
            idx = torch.tensor(keep, device=self.device)
            parts = {k: torch.index_select(t, 0, idx, out=storage((len(keep), *t.shape[1:]), t.dtype, t.device))
                     for k, t in le.parts().items()}  # [E_kept, ...] each
            return self._stack(layer, [le.global_ids[i] for i in keep], parts)

    def _stack(self, layer: int, ids: list[int], parts: dict[str, torch.Tensor]) -> LayerExperts:
        to_local = torch.full((self.spec.moe.num_experts + 1,), -1, dtype=torch.int64, device=self.device)
        to_local[torch.tensor(ids, device=self.device)] = torch.arange(len(ids), device=self.device)
        le = LayerExperts(global_ids=tuple(ids), to_local=to_local, **{k: t.contiguous() for k, t in parts.items()})
        warmup_moe(le.w13, le.w2, self.spec.moe.top_k, self.backend, self.dtype, w13_scale=le.w13_scale,
                   w2_scale=le.w2_scale, block_shape=self.block, split_scales=self.split_scales,
                   out_dtype=COMBINE_DTYPE,  # forward's: the top-k sum compiles per output dtype
                   act=self.acts[layer], b13=le.b13, b2=le.b2)  # compile the Triton kernels now
        return le

    @staticmethod
    def routed(topk_ids: torch.Tensor) -> dict[int, int]:
        """Tokens per global expert id in topk_ids [T, k] (ids of -1 ignored), in id order."""
        return routed_counts(topk_ids)

    def snapshot(self, layer: int) -> LayerExperts | None:
        """The layer's experts as held now; one call uses one snapshot for its check and its compute."""
        return self.layers.get(layer)

    def missing(self, layer: int, routed: dict[int, int], snap: LayerExperts | None = _NOW) -> list[int]:
        """The expert ids of `routed` (see `routed`) that are not held here (in `snap`, if given: None, as snapshot()
        returns for a layer not held, holds nothing)."""
        le = self.layers.get(layer) if snap is _NOW else snap
        return sorted(set(routed) - set(le.global_ids if le else ()))

    def forward(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                snap: LayerExperts | None = _NOW) -> torch.Tensor:
        """hidden [T, H], topk_ids [T, k] global ids (-1 = not here), topk_weights [T, k] -> [T, H] float64.

        Every id >= 0 must be held (see `missing`; pass the same `snap` to both); its contribution is weighted
        and summed per token in float64, so partial sums from any split of the experts over shards add up to
        the same bits as one sum over all of them (COMBINE_DTYPE; the caller rounds to the model's dtype). On the
        Triton backend each slot's product is fp32, whose bits may follow the tiles (picked by rows per held expert).
        """
        le = self.layers.get(layer) if snap is _NOW else snap
        if le is None or hidden.shape[0] == 0:
            return torch.zeros_like(hidden, dtype=COMBINE_DTYPE)
        local = _local_ids(le.to_local, topk_ids)  # [T, k]
        return fused_moe(hidden, le.w13, le.w2, local, topk_weights, backend=self.backend, out_dtype=COMBINE_DTYPE,
                         w13_scale=le.w13_scale, w2_scale=le.w2_scale, block_shape=self.block,
                         split_scales=self.split_scales, act=self.acts[layer], b13=le.b13, b2=le.b2)

    def count(self, layer: int, routed: dict[int, int], compute_us: int = 0, duplicate: bool = False) -> None:
        """A call served (for stats): its tokens per expert (see `routed`) and compute_us (ServedCalls.count)."""
        self.served.count(layer, routed, compute_us, duplicate)


def _local_ids(to_local: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """to_local [E + 1] looked up at topk_ids [T, k] -> [T, k] int64 local indices (-1: index E, not held here); on the
    CPU by numpy (~2 us, where torch's indexing takes ~10: it runs per layer and step)."""
    if to_local.device.type == "cpu" and topk_ids.device.type == "cpu":
        return torch.from_numpy(to_local.numpy()[topk_ids.numpy()])
    return to_local[topk_ids.long()]


def _held(layers: list[tuple[int, LayerExperts]]) -> list[tuple[int, int]]:
    return sorted((l, e) for l, le in layers for e in le.global_ids)


def _weight_bytes(layers: list[tuple[int, LayerExperts]]) -> int:
    return sum(t.numel() * t.element_size() for _, le in layers for t in le.parts().values())
