"""DeepSeek sparse attention (DSA): the lightning indexer's shape and per-layer schedule, read from config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elasticmoe.model.family import Family
from elasticmoe.model.family_config import ModelSpecError, config_get

INDEXED = "indexed_attention"  # the one layer type of DSA models (config.layer_types)


@dataclass(frozen=True)
class IndexerSpec:
    """Per query, the `topk` cached keys it attends to, picked by a small multi-head scorer (self_attn.indexer)."""

    n_heads: int  # index_n_heads
    head_dim: int  # index_head_dim (its first rope_dim dims rotated)
    topk: int  # index_topk
    rope_interleave: bool  # pairwise rotary (GLM-MoE-DSA) or half-split (DeepSeek-V3.2)
    own: tuple[bool, ...]  # per layer: runs its own indexer; False reuses the previous layer's selection
    eps: float = 1e-6  # its key LayerNorm's epsilon (fixed by transformers)


def _positive(cfg: Any, name: str) -> int:
    value = config_get(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelSpecError(f"config.{name}={value!r}: the sparse-attention indexer needs a positive integer")
    return value


def _schedule(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    """Per layer: runs its own indexer ("full") or reuses the previous one's picks ("shared", config.indexer_types)."""
    types = config_get(cfg, "layer_types")
    if types is not None and (len(types) != num_layers or set(types) - {INDEXED}):
        raise ModelSpecError(f"config.layer_types={types!r}: want {num_layers} of {INDEXED!r} (every layer of a "
                             f"sparse-attention model is indexed)")
    kinds = config_get(cfg, "indexer_types")
    if kinds is None:
        return (True,) * num_layers
    if len(kinds) != num_layers or set(kinds) - {"full", "shared"}:
        raise ModelSpecError(f"config.indexer_types={kinds!r}: want {num_layers} of 'full' / 'shared'")
    if kinds[0] != "full":  # transformers fails its first forward: nothing to share yet
        raise ModelSpecError(f"config.indexer_types[0]={kinds[0]!r}: the first layer must run its own indexer "
                             "('full'), a 'shared' layer reuses the previous one's")
    return tuple(k == "full" for k in kinds)


def indexer_spec(cfg: Any, fam: Family, num_layers: int, rope_dim: int) -> IndexerSpec | None:
    """The family's indexer (None when it has none); ModelSpecError naming the field it cannot run."""
    if fam.indexer_rope is None:
        return None
    if not config_get(cfg, "q_lora_rank"):
        raise ModelSpecError(f"config.q_lora_rank={config_get(cfg, 'q_lora_rank')!r}: the sparse-attention indexer "
                             "reads the query LoRA bottleneck (a positive q_lora_rank)")
    n_heads, head_dim, topk = (_positive(cfg, k) for k in ("index_n_heads", "index_head_dim", "index_topk"))
    if head_dim < rope_dim:
        raise ModelSpecError(f"config.index_head_dim={head_dim}: the indexer rotates its first qk_rope_head_dim "
                             f"({rope_dim}) dims, so it needs at least that many")
    return IndexerSpec(n_heads=n_heads, head_dim=head_dim, topk=topk, rope_interleave=fam.indexer_rope == "pairs",
                       own=_schedule(cfg, num_layers))
