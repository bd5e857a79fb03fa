"""The MLP weight shapes transformers builds from a config.json, cached by config and transformers version."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from elasticmoe.model.embedded import cache_dir, write_atomic

log = logging.getLogger(__name__)


def built_shapes(config: Any, names: list[str]) -> dict[str, tuple[int, ...] | None]:
    """Parameter name -> shape (None: transformers builds no such parameter) for `names`, from the model `config`
    describes. Building it imports the family's modeling code (~3-5 s of CPU, each gateway start); the answer is
    kept in $ELASTICMOE_CACHE/mlp_shapes under a hash of the config, the names and transformers' version, so a
    restarted or added gateway reads it instead. Raises what transformers raises when it cannot build the model."""
    import transformers

    fields = json.loads(config.to_json_string(use_diff=False))
    fields.pop("_name_or_path", None)  # where the checkpoint lies builds no other shape
    key = json.dumps([fields, sorted(names), transformers.__version__], sort_keys=True)
    path = cache_dir() / "mlp_shapes" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
    try:
        return {n: None if s is None else tuple(s) for n, s in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):  # absent, or unreadable: built again and rewritten
        pass
    want = _meta_shapes(config)
    shapes = {n: want.get(n) for n in names}
    try:
        write_atomic(path, json.dumps(shapes).encode())
    except OSError as e:  # a read-only cache: the check still ran
        log.debug("MLP shapes not cached at %s: %s", path, e)
    return shapes


def _meta_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the transformers model `config` describes, built on the meta device; raises
    what transformers raises when it cannot build it there."""
    import torch
    import transformers

    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:  # a causal LM outside the Auto mapping (Mistral 4): its class by name
            model = getattr(transformers, config.architectures[0])._from_config(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}
