"""Triton's interpreter (TRITON_INTERPRET=1: tests, --smoke runs) without its repeated language patching.

Triton 3.9's interpreter patches triton.language's builtins (inspect.getmembers over tl, tl.core, tl.math and
tl.tensor, ~5 ms) once per launch and again at every call of a @triton.jit device function inside a program:
_tile_ids and _scaled_dot per program and K step, tl.zeros, tl.cdiv, tl.sigmoid. Those repeats patch what the
launch (or the first such call) has already patched, and restore nothing, so they change nothing; they were ~30% of
an interpreted MoE forward. install() makes a repeat within one launch a no-op: the first patch of each set of
language modules per launch runs as before, and each launch starts afresh. Compiled (GPU) kernels never come here.
"""

from __future__ import annotations

import functools
import inspect

import triton


def interpreting() -> bool:
    """TRITON_INTERPRET=1 (read by Triton at import)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


class _Unpatched:
    """What a skipped patch returns in place of Triton's scope: nothing to restore."""

    @staticmethod
    def restore() -> None:
        return None


def install() -> bool:
    """Under the interpreter, patch the language once per launch and module set; True when installed (now or
    before). A Triton without the expected internals is left as it is (slower, the same results)."""
    if not interpreting():
        return False
    from triton.runtime import interpreter as ti

    if getattr(ti, "_elasticmoe_once", False):
        return True
    if not (callable(getattr(ti, "_patch_lang", None)) and hasattr(ti, "GridExecutor")):
        return False
    lang = (ti.tl, ti.tl.core)
    patch_lang, launch = ti._patch_lang, ti.GridExecutor.__call__
    patched: set[frozenset] = set()  # language module sets patched in the current launch

    def once(fn):
        key = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang)
        if key in patched:
            return _Unpatched
        scope = patch_lang(fn)
        patched.add(key)
        return scope

    @functools.wraps(launch)
    def fresh_launch(self, *args, **kwargs):
        patched.clear()  # the launch patches (and at its end restores) its kernel's modules: start afresh
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.clear()

    ti._patch_lang, ti.GridExecutor.__call__, ti._elasticmoe_once = once, fresh_launch, True
    return True
