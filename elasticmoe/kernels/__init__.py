"""Fused Mixture-of-Experts kernels: a torch path (CPU serving) and a Triton path (CUDA), one contract.

Only torch, numpy, triton and the stdlib are imported here; triton itself is imported lazily, on the first
call that uses the Triton backend (so TRITON_INTERPRET can still be set by then). Importing the package
pins Triton's environment (each overridable by setting it first): TRITON_DEFAULT_FP_FUSION=1 (Triton 3.9's
default, whose flip in 3.10 would otherwise change results and cache keys) and TRITON_CACHE_DIR =
$ELASTICMOE_CACHE/triton (compiled kernels survive restarts next to the other caches).
"""

import os as _os
from pathlib import Path as _Path


def _triton_env() -> None:
    root = _Path(_os.environ.get("ELASTICMOE_CACHE", _Path.home() / ".cache" / "elasticmoe")).expanduser()
    _os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    _os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


_triton_env()

from .act import ExpertAct  # noqa: E402
from .api import BACKEND_ENV, check_moe_inputs, fused_moe, resolve_backend, warmup_moe  # noqa: E402
from .reference import fused_moe_reference  # noqa: E402

__all__ = ["BACKEND_ENV", "ExpertAct", "check_moe_inputs", "fused_moe", "fused_moe_reference", "resolve_backend",
           "warmup_moe"]
