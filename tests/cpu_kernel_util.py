"""Where the skinny C kernel (kernels/cpu_gemm.c) must build: its tests skip only where the machine cannot run it."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from elasticmoe.kernels import cpu_gemm


def _compiler() -> list[str] | None:
    """$CC (a command line) or cc / gcc on PATH, as cpu_gemm looks for it; None where there is none."""
    try:
        cc = shlex.split(os.environ.get("CC", ""))
    except ValueError:
        return None
    return cc or ([found] if (found := shutil.which("cc") or shutil.which("gcc")) else None)


def _cpu_flags() -> set[str]:
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def buildable_here() -> bool:
    """Linux x86-64 with AVX2, FMA and F16C, a C compiler, and the kernel not switched off: read from the machine, not
    from cpu_gemm.available() (a cpu_gemm.c that no longer compiles made that False, and every kernel test skipped)."""
    return (os.environ.get(cpu_gemm.ENV_SWITCH, "1") != "0" and platform.system() == "Linux"
            and platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= _cpu_flags()
            and _compiler() is not None)


def compile_errors() -> str:
    """What the compiler says of cpu_gemm.c with the package's flags ('' when it builds)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([*_compiler(), *cpu_gemm._FLAGS, "-o", str(Path(tmp) / "k.so"), str(cpu_gemm._SRC)],
                             capture_output=True, text=True, timeout=120)
    return "" if run.returncode == 0 else run.stderr[-4000:]


needs_kernel = pytest.mark.skipif(not buildable_here(), reason="the skinny C kernel cannot run here (needs Linux "
                                  "x86-64 with AVX2/FMA/F16C and a C compiler)")
