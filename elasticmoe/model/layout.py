"""The MoE layout a controller plans with (layers, MoE layers, experts), read without torch where it can be."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MoELayout:
    num_layers: int
    moe_layers: tuple[int, ...]  # the MoE layers' indices, ascending
    num_experts: int  # routed experts per MoE layer


def moe_layout(model: str | os.PathLike) -> MoELayout:
    """The layout of `model` (a checkpoint directory, a cached hub repo or `tiny:<family>`), as open_model's spec
    gives it. Where a process derived that spec before from the same config.json bytes (a gateway, a shard, the app
    build where it reads the spec; model.spec_cache), a JSON read: no torch and no transformers import (~1.6 s of
    CPU and ~200 MB of memory in a controller replica here). Otherwise it opens the model (importing torch), which
    raises as open_model does, and keeps the spec for the next."""
    from elasticmoe.model.hub import HubError, resolve
    from elasticmoe.model.spec_cache import cached_layout

    model = os.fspath(model)
    if model.startswith("tiny:"):
        from elasticmoe.model.embedded import ensure_tiny_model

        model = str(ensure_tiny_model(model[len("tiny:"):]))
    try:
        got = cached_layout(resolve(model).path / "config.json")
    except HubError:  # open_model says what is wrong with it
        got = None
    if got is not None:
        return MoELayout(got["num_layers"], tuple(got["moe_layers"]), got["num_experts"])
    from elasticmoe.model.files import open_model
    from elasticmoe.model.spec_cache import store_layout

    files = open_model(model, check_shapes=False)
    spec = files.spec
    if files.config is None:  # the spec came from the cache (a derived one was kept with its layout): write it whole
        store_layout(files.ckpt.path / "config.json", spec)
    return MoELayout(spec.num_layers, tuple(spec.moe.moe_layers), spec.moe.num_experts)
