"""A checkpoint's ModelSpec kept on disk, by its config.json, transformers' version and this package's model code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import pickle
from functools import lru_cache
from pathlib import Path

from elasticmoe.model.embedded import cache_dir, write_atomic
from elasticmoe.model.spec import ModelSpec

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _code_hash() -> str:
    """The model code's sources (elasticmoe/model/*.py): a change to how a spec is derived makes new keys."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _path(config_file: Path) -> Path:
    key = hashlib.sha256(config_file.read_bytes() + importlib.metadata.version("transformers").encode()
                         + _code_hash().encode()).hexdigest()
    return cache_dir() / "specs" / f"{key}.pickle"


def cached_spec(config_file: Path) -> ModelSpec | None:
    """The spec derived before from these exact config.json bytes, or None. Reading it imports no transformers
    (~1 s of CPU in each expert shard's and controller's start here); a torn or foreign entry is None."""
    try:
        with open(_path(config_file), "rb") as f:
            spec = pickle.load(f)
    except Exception:  # noqa: BLE001 - absent, torn, or written by other code: derived again
        return None
    return spec if isinstance(spec, ModelSpec) else None


def store_spec(config_file: Path, spec: ModelSpec) -> None:
    """Keep the spec derived from config_file (written whole, then renamed into place); a read-only cache keeps
    nothing."""
    try:
        write_atomic(_path(config_file), pickle.dumps(spec))
    except OSError as e:
        log.debug("spec of %s not cached: %s", config_file, e)
