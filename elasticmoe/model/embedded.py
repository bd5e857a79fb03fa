"""The embedded default models: `tiny:<family>` checkpoints made once, on first use, in a local cache."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$ELASTICMOE_CACHE, else ~/.cache/elasticmoe."""
    return Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()


def ensure_tiny_model(family: str) -> Path:
    """The tiny checkpoint of `family` (default sizes, seed 0), made atomically if absent; safe across processes."""
    from elasticmoe.model.tiny import TINY_FAMILIES, make_tiny_model

    if family not in TINY_FAMILIES:
        raise ValueError(f"model: unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"tiny-{family}"
    if (out / "config.json").is_file():
        return out
    with open(root / f".tiny-{family}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{family}-", dir=root))
            try:
                make_tiny_model(family, tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return out
