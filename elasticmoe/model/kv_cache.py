"""The paged KV cache: each layer's K/V or MLA latent (and index keys) in blocks, linear layers' states per slot."""

from __future__ import annotations

import torch

from elasticmoe.model.block_table import BlockTable
from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.spec import AttentionSpec, ModelSpec


class KVCache:
    """Per layer: K and V [blocks, block_size, kv_heads, d] (GQA) or the latent [blocks, block_size, r + rope] (MLA),
    at that layer's own shapes (AttentionSpec.layer), then, on a layer running a sparse-attention indexer, its keys
    [blocks, block_size, index_head_dim]; a linear-attention or short-conv layer keeps no K/V but its state per slot
    (`linear`: layer -> DeltaState). A layer sharing another's keys and values (AttentionSpec.kv_source) holds none:
    its entry is that layer's tensors. Which blocks hold a slot's positions: `table` (BlockTable); the tensors hold
    `num_blocks` blocks and one more, the table's null block (kept zero). num_blocks None: every slot gets
    ceil(max_len / block_size) blocks of its own, fixed (the unpaged size; a model driven without an engine's block
    pool)."""

    def __init__(self, spec: ModelSpec, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 num_blocks: int | None = None, block_size: int = 16):
        self.num_slots, self.max_len, self.block_size = num_slots, max_len, block_size
        max_blocks = -(-max_len // block_size)
        self.num_blocks = num_slots * max_blocks if num_blocks is None else num_blocks
        self.table = BlockTable(num_slots, max_blocks, block_size, self.num_blocks, device, num_blocks is None)
        kinds = spec.linear.layers if spec.linear else (False,) * spec.num_layers
        self.linear = {i: DeltaState(spec.linear, num_slots, dtype, device) for i, lin in enumerate(kinds) if lin}
        ix = spec.attention.indexer
        self.indexed = ix.own if ix else (False,) * spec.num_layers  # per layer: index keys kept
        a, self.layers, rows = spec.attention, [], (self.num_blocks + 1, block_size)
        for i, lin in enumerate(kinds):
            if a.source(i) != i:  # KV sharing: the source's tensors, written by it alone
                self.layers.append(self.layers[a.source(i)])
                continue
            shapes = [] if lin else _cache_shapes(a.layer(i), rows)
            shapes += [(*rows, ix.head_dim)] if self.indexed[i] else []
            self.layers.append([torch.zeros(s, dtype=dtype, device=device) for s in shapes])
        self.owned = [i for i in range(spec.num_layers) if a.source(i) == i]  # the layers holding their own

    @staticmethod
    def write(t: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write values [T, ...] into cache tensor t [blocks, block_size, ...] at flat rows index [T]
        (StepBatch.write_index)."""
        t.view(-1, *t.shape[2:])[index] = values.to(t.dtype)

    @staticmethod
    def read(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Cache tensor t [blocks, block_size, ...] at flat rows index [B, L] (StepBatch.prefill_reads,
        DecodeGroup.read): [B, L, ...]. index_select, not advanced indexing: the same rows, on CPU 2-7x faster up
        to 16K rows, 1.1-1.5x at 64K (one thread)."""
        return t.view(-1, *t.shape[2:]).index_select(0, index.flatten()).view(*index.shape, *t.shape[2:])

    def of_slot(self, t: torch.Tensor, slot: int) -> torch.Tensor:
        """Cache tensor t's positions of `slot`, as many as its blocks hold: [capacity, ...] (a copy)."""
        return self.read(t, self.table.read_index(slot, self.table.capacity(slot)))[0]

    def clear(self, slot: int, length: int, blocks: list[int] | tuple[int, ...] | None = None) -> None:
        """Zero the slot's blocks holding positions [0, length) (`blocks`: those blocks, as the engine's pool has
        them: the table's row may be another's still, or hold blocks shared), and its linear-attention states.
        Decode rows read their slot up to the longest row of their group, masked; a masked NaN or inf (left by a
        request that failed on a numerical fault) still poisons the sum."""
        if blocks is None:
            blocks = self.table.rows[slot][:-(-length // self.block_size)]
        if blocks:
            index = torch.tensor(blocks, device=self.table.tensor.device)  # [n]
            for i in self.owned:
                for t in self.layers[i]:
                    t.index_fill_(0, index, 0)
        for state in self.linear.values():
            state.clear(slot)

    def index_keys(self, layer: int) -> torch.Tensor:
        """The layer's sparse-attention index keys [blocks, block_size, index_head_dim] (after its K/V or latent)."""
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

    @staticmethod
    def nbytes(spec: ModelSpec, dtype: torch.dtype, num_slots: int, num_blocks: int, block_size: int) -> int:
        """What a cache of these sizes allocates: its blocks and the null block, and the slots' linear states."""
        return ((num_blocks + 1) * block_size * KVCache.bytes_per_token(spec, dtype)
                + num_slots * KVCache.bytes_per_slot(spec, dtype))


def _cache_shapes(a: AttentionSpec, rows: tuple[int, int]) -> list[tuple[int, ...]]:
    """One layer's cache tensors over rows (blocks, block_size): the latent (MLA), or K and V."""
    if a.kind == "mla":
        return [(*rows, a.kv_lora_rank + a.rope_dim)]
    return [(*rows, a.num_kv_heads, a.head_dim), (*rows, a.num_kv_heads, a.v_head_dim)]
