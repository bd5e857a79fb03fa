"""The slot-based KV cache: each layer's K/V or MLA latent (and index keys), linear layers' states."""

from __future__ import annotations

import torch

from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.spec import AttentionSpec, ModelSpec


class KVCache:
    """Per layer: K and V [slots, max_len, kv_heads, d] (GQA) or the latent [slots, max_len, r + rope] (MLA), at
    that layer's own shapes (AttentionSpec.layer), then, on a layer running a sparse-attention indexer, its keys
    [slots, max_len, index_head_dim]; a linear-attention layer keeps no K/V but its state per slot (`linear`: layer
    -> DeltaState). A layer sharing another's keys and values (AttentionSpec.kv_source) holds none: its entry is that
    layer's tensors."""

    def __init__(self, spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.num_slots, self.max_len = num_slots, max_len
        kinds = spec.linear.layers if spec.linear else (False,) * spec.num_layers
        self.linear = {i: DeltaState(spec.linear, num_slots, dtype, device) for i, lin in enumerate(kinds) if lin}
        ix = spec.attention.indexer
        self.indexed = ix.own if ix else (False,) * spec.num_layers  # per layer: index keys kept
        a, self.layers = spec.attention, []
        for i, lin in enumerate(kinds):
            if a.source(i) != i:  # KV sharing: the source's tensors, written by it alone
                self.layers.append(self.layers[a.source(i)])
                continue
            shapes = [] if lin else _cache_shapes(a.layer(i), num_slots, max_len)
            shapes += [(num_slots, max_len, ix.head_dim)] if self.indexed[i] else []
            self.layers.append([torch.zeros(s, dtype=dtype, device=device) for s in shapes])
        self.owned = [i for i in range(spec.num_layers) if a.source(i) == i]  # the layers holding their own

    def clear(self, slot: int, length: int) -> None:
        """Zero positions [0, length) of a slot, and its linear-attention states. Decode rows read their slot up to
        the longest row of their group, masked; a masked NaN or inf (left by a request that failed on a numerical
        fault) still poisons the sum."""
        for i in self.owned:
            for t in self.layers[i]:
                t[slot, :length].zero_()
        for state in self.linear.values():
            state.clear(slot)

    def index_keys(self, layer: int) -> torch.Tensor:
        """The layer's sparse-attention index keys [slots, max_len, index_head_dim] (after its K/V or latent)."""
        if not self.indexed[layer]:
            raise ValueError(f"layer {layer} keeps no index keys (it runs no indexer of its own)")
        return self.layers[layer][-1]

    @staticmethod
    def bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
        """K/V bytes a cached token takes (attention layers only, each at its own width, with its indexer's keys: a
        linear layer's state is per slot; none for a layer sharing another's keys and values)."""
        a, kinds = spec.attention, spec.linear.layers if spec.linear else (False,) * spec.num_layers
        width = sum(a.layer(i).cache_width for i, lin in enumerate(kinds) if not lin and a.source(i) == i)
        index = sum(a.indexer.own) * a.indexer.head_dim if a.indexer else 0
        return (width + index) * torch.empty(0, dtype=dtype).element_size()

    @staticmethod
    def bytes_per_slot(spec: ModelSpec, dtype: torch.dtype) -> int:
        """Bytes of the linear-attention layers' states a slot takes, whatever its length: both copies (DeltaState)
        of the conv window (in `dtype`) and of the recurrent state (float32)."""
        if spec.linear is None:
            return 0
        conv, rec = spec.linear.state_floats()
        return 2 * sum(spec.linear.layers) * (conv * torch.empty(0, dtype=dtype).element_size() + rec * 4)


def _cache_shapes(a: AttentionSpec, num_slots: int, max_len: int) -> list[tuple[int, ...]]:
    """One layer's cache tensors: the latent (MLA), or K and V."""
    if a.kind == "mla":
        return [(num_slots, max_len, a.kv_lora_rank + a.rope_dim)]
    return [(num_slots, max_len, a.num_kv_heads, a.head_dim), (num_slots, max_len, a.num_kv_heads, a.v_head_dim)]
