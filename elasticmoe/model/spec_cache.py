"""A checkpoint's ModelSpec and its MoE layout (JSON: read without torch) kept on disk, keyed by its config and code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import pickle
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from elasticmoe.model.embedded import cache_dir, write_atomic

if TYPE_CHECKING:  # the spec module imports torch: the layout's readers (the controller) import neither
    from elasticmoe.model.spec import ModelSpec

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _code_hash() -> str:
    """The model code's sources (elasticmoe/model/*.py): a change to how a spec is derived makes new keys."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _path(config_file: Path, suffix: str = ".pickle") -> Path:
    key = hashlib.sha256(config_file.read_bytes() + importlib.metadata.version("transformers").encode()
                         + _code_hash().encode()).hexdigest()
    return cache_dir() / "specs" / f"{key}{suffix}"


def cached_spec(config_file: Path) -> ModelSpec | None:
    """The spec derived before from these exact config.json bytes, or None. Reading it imports no transformers
    (~1 s of CPU in each expert shard's and controller's start here); a torn or foreign entry is None."""
    from elasticmoe.model.spec import ModelSpec

    try:
        with open(_path(config_file), "rb") as f:
            spec = pickle.load(f)
    except Exception:  # noqa: BLE001 - absent, torn, or written by other code: derived again
        return None
    return spec if isinstance(spec, ModelSpec) else None


def cached_layout(config_file: Path) -> dict | None:
    """{"num_layers", "moe_layers", "num_experts"} of the spec kept for these config.json bytes, or None (absent,
    torn, or not what store_spec writes). Reads JSON only: no torch, no transformers."""
    try:
        got = json.loads(_path(config_file, ".layout.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(got, dict) or set(got) != {"num_layers", "moe_layers", "num_experts"}:
        return None
    n, layers, experts = got["num_layers"], got["moe_layers"], got["num_experts"]
    ints = [n, experts, *layers] if isinstance(layers, list) else [None]
    if not all(type(v) is int for v in ints) or n < 1 or experts < 1 or not layers \
            or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n:
        return None
    return got


def store_spec(config_file: Path, spec: ModelSpec) -> None:
    """Keep the spec derived from config_file (written whole, then renamed into place); a read-only cache keeps
    nothing."""
    try:
        write_atomic(_path(config_file), pickle.dumps(spec))
    except OSError as e:
        log.debug("spec of %s not cached: %s", config_file, e)
        return
    store_layout(config_file, spec)


def store_layout(config_file: Path, spec: ModelSpec) -> None:
    """Keep what cached_layout reads of the spec derived from config_file (a read-only cache keeps nothing)."""
    layout = {"num_layers": spec.num_layers, "moe_layers": list(spec.moe.moe_layers),
              "num_experts": spec.moe.num_experts}
    try:
        write_atomic(_path(config_file, ".layout.json"), json.dumps(layout).encode())
    except OSError as e:
        log.debug("layout of %s not cached: %s", config_file, e)
