"""The embedded default models: `tiny:<family>` checkpoints and the trained `tiny:demo`, made once, on first use,
in a local cache."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

DEMO = "demo"  # `tiny:demo`: the small Mixtral trained on the embedded corpus (elasticmoe/model/demo.py)
TINY_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")  # tiny:<family>


def check_tiny_family(family: str) -> None:
    """Raise ValueError naming `model` unless `tiny:<family>` is an embedded model (no torch import: config uses it)."""
    if family != DEMO and family not in TINY_FAMILIES:
        raise ValueError(f"model: unknown tiny family {family!r}; choose one of {', '.join((*TINY_FAMILIES, DEMO))}")


def cache_dir() -> Path:
    """$ELASTICMOE_CACHE, else ~/.cache/elasticmoe."""
    return Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a cache file whole: to a temporary file beside it, then renamed into place (readers see the old file
    or the new one, never half of one; concurrent writers each succeed). Raises OSError (a read-only cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ensure(name: str, make: Callable[[Path], object]) -> Path:
    """`cache_dir()/name`, made by `make(tmp_dir)` then renamed into place if absent; safe across processes."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    if (out / "config.json").is_file():
        return out
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
            try:
                make(tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def demo_model_dir() -> Path:
    """Where the demo model lives (or will): its name carries a hash of the training recipe."""
    from elasticmoe.model.demo import DemoArgs

    return cache_dir() / f"demo-mixtral-{DemoArgs().key()}"


def ensure_demo_model(show_progress: bool | None = None) -> Path:
    """The trained demo checkpoint, trained (about 20 s on 2 idle cores) and cached on first use."""
    from elasticmoe.model.demo import train_demo_model

    return _ensure(demo_model_dir().name, lambda tmp: train_demo_model(tmp, show_progress=show_progress))


def ensure_tiny_model(family: str) -> Path:
    """The tiny checkpoint of `family` (default sizes, seed 0), made atomically if absent; safe across processes.
    `demo` is the trained demo model (see ensure_demo_model). A cached one imports no transformers modeling code
    (~5 s of CPU: the expert shards and the controller open `tiny:` models without it)."""
    check_tiny_family(family)
    if family == DEMO:
        return ensure_demo_model()
    return _ensure(f"tiny-{family}", _make_tiny(family))


def _make_tiny(family: str) -> Callable[[Path], object]:
    """make_tiny_model(family, dir), imported only when a checkpoint is made."""
    def make(tmp: Path) -> object:
        from elasticmoe.model.tiny import make_tiny_model

        return make_tiny_model(family, tmp)
    return make
