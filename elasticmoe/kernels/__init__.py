"""Fused Mixture-of-Experts kernels: a torch path (CPU serving) and a Triton path (CUDA), one contract.

Only torch, triton and the stdlib are imported here; triton itself is imported lazily, on the first
call that uses the Triton backend (so TRITON_INTERPRET can still be set by then).
"""

from .api import BACKEND_ENV, fused_moe, resolve_backend
from .reference import fused_moe_reference

__all__ = ["BACKEND_ENV", "fused_moe", "fused_moe_reference", "resolve_backend"]
