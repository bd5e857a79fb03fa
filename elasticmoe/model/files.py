"""A checkpoint opened for execution (ModelFiles): open_model, and read_spec from its config.json alone."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError, load_config
from elasticmoe.model.names import WeightNames
from elasticmoe.model.renames import VIEWS
from elasticmoe.model.family_config import language_model, placeholder_ids
from elasticmoe.model.spec import ModelSpec, ModelSpecError, check_config_keys, check_model_type, spec_from_config
from elasticmoe.model.spec_cache import cached_spec, store_spec


@dataclass(frozen=True)
class ModelFiles:
    """A checkpoint opened for execution: its files, HF config, generic spec and weight names."""

    ckpt: Checkpoint
    config: Any  # None where the spec came from the cache (open_model without the shape check)
    spec: ModelSpec
    names: WeightNames


def _config_and_spec(path: Path) -> tuple[Any, ModelSpec]:
    """The transformers config and the spec of checkpoint directory `path`, from its config.json alone."""
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        config = load_config(path)
        fam = check_model_type(config)  # before any weight is read: hybrids and unverified families fail here, by name
        check_config_keys(raw, config.model_type)
        text, text_raw = language_model(config, raw, fam) if fam.text_model else (config, raw)
        if fam.text_model:
            check_model_type(text, inner=True)
            check_config_keys(text_raw, text.model_type)
        spec = spec_from_config(text)
        if fam.placeholders:  # image / audio placeholder ids, embedded as the pad token on text
            spec = dataclasses.replace(spec, placeholder_ids=placeholder_ids(config, text, fam))
    except ModelSpecError as e:
        raise ModelSpecError(f"{config_file}: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON: {e}") from e
    store_spec(config_file, spec)
    return config, spec


def read_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """The spec of a checkpoint directory from its config.json alone, no weight file opened: what Serve's app build
    reads on a head that may hold only the JSON files (elasticmoe.app). Raises as open_model does."""
    return _config_and_spec(Path(model_dir))[1]


def open_model(model: str | os.PathLike, check_shapes: bool = True) -> ModelFiles:
    """Open a checkpoint dir (a str or a path, or `tiny:<family>`): index tensors, derive the spec. Reads no
    weights. `check_shapes`: check the dense and shared-expert MLP weights against the model transformers builds
    (WeightNames.check_mlp_shapes: importing its modeling code is ~5 s of CPU); the expert shards and the
    controller, which never load those weights, skip it (the gateway, which does, refuses the checkpoint); without
    it the spec a process derived before from the same config.json bytes is read from the cache (model.spec_cache:
    no transformers import, ~1 s of CPU here), and `config` is None."""
    model = os.fspath(model)
    if model.startswith("tiny:"):
        from elasticmoe.model.embedded import ensure_tiny_model

        model = str(ensure_tiny_model(model[len("tiny:"):]))
    ckpt = Checkpoint(model)
    spec = None if check_shapes else cached_spec(ckpt.path / "config.json")
    config, spec = (None, spec) if spec is not None else _config_and_spec(ckpt.path)
    views, ignored = VIEWS[spec.model_type](ckpt, spec) if spec.model_type in VIEWS else ({}, set())
    ignored |= {n for n in ckpt.names() if any(re.match(p, n) for p in spec.ignored)}  # as transformers ignores them
    if views or ignored:  # tensors named or laid out unlike the Llama-style checkpoints
        ckpt.set_views(views, ignored)
    names = WeightNames(ckpt, spec)
    missing = [i for i in spec.moe.moe_layers if names.layers[i].block is None]
    if missing:
        raise CheckpointError(f"{ckpt.path}: config says layers {missing} are MoE but no expert tensors exist there")
    dense = [i for i, n in enumerate(names.layers) if n.block is not None and not spec.moe.sparse_layers[i]]
    if dense:  # else run as MoE layers whose experts no ExpertStore loads
        raise CheckpointError(f"{ckpt.path}: layers {dense} hold experts but config.json makes them dense "
                              "(first_k_dense_replace / mlp_only_layers / decoder_sparse_step / mlp_layer_types)")
    names.check_all_used()
    if check_shapes:
        names.check_mlp_shapes(config)
    return ModelFiles(ckpt, config, spec, names)
