"""Which dense weights a layer loads, in which dtype: shared by the loader (DenseModel) and its sizer (dense_bytes)."""

from __future__ import annotations

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.names import LayerNames
from elasticmoe.model.spec import ModelSpec

F32_EXTRAS = ("layer_scalar", "router_scale", "expert_scale")  # a layer's extras kept in float32 (the rest in dtype)
F32_ATTN = ("index_weights", "moa_router")  # the indexer's head weights, in float32 as transformers keeps them; the
#                                             attention experts' router (model.moa), stored precision
NORMED_ATTN = ("q_norm", "k_norm")  # loaded as norms (DenseModel.load_norm)


def own_attn(spec: ModelSpec, ckpt: Checkpoint, i: int, names: LayerNames) -> dict[str, str]:
    """Layer i's attention weights to load, by role: a layer sharing another's keys and values drops its k/v
    projections and norms, as transformers builds none (it drops them too); a value projection where the values are
    the keys is refused."""
    a = spec.attention
    if a.source(i) != i:
        return {r: n for r, n in names.attn.items() if r not in ("k", "v", "k_bias", "v_bias", "k_norm")}
    if a.v_from_k and a.v_from_k[i] and "v" in names.attn:
        raise CheckpointError(f"{ckpt.file_of(names.attn['v'])}: {names.attn['v']!r}: layer {i}'s values are "
                              f"its keys (config.attention_k_eq_v), so it has no v_proj")
    return dict(names.attn)
