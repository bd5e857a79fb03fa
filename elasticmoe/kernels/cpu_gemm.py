"""Skinny CPU GEMMs (cpu_gemm.c: fp32, bf16 or fp16 weights, fp32 sums), built with the C compiler, run via ctypes.

Decode multiplies each weight by 1-16 rows; MKL's sgemm streams the weight well below memory bandwidth
at those shapes (benchmarks/KERNELS.md), and oneDNN's bf16/fp16 GEMMs on AVX2 (no native bf16) are slower
still at any row count. The C loop reads each weight row once. Anything it cannot run (no compiler, no
AVX2/FMA/F16C, not x86-64 Linux, ELASTICMOE_CPU_GEMM=0) falls back to torch silently.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu_gemm.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
ENV_SWITCH = "ELASTICMOE_CPU_GEMM"
MAX_ROWS = 16  # fp32: beyond this many rows per weight, MKL's blocked sgemm is as fast or faster
_SYMBOLS = {torch.float32: "seg_gemm_f32", torch.bfloat16: "seg_gemm_bf16", torch.float16: "seg_gemm_f16"}
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags and "f16c" in flags


def _cache_dir() -> Path:
    """$ELASTICMOE_CACHE/cpu_gemm: the rule of model.embedded.cache_dir (kernels/ may not import model/)."""
    root = Path(os.environ.get("ELASTICMOE_CACHE", Path.home() / ".cache" / "elasticmoe")).expanduser()
    return root / "cpu_gemm"


def _build(again: bool = False) -> Path | None:
    """Compile cpu_gemm.c into the cache (once per source + flags, or again); returns the .so path or None."""
    try:  # CC may hold a command line ("ccache cc", "gcc -m64")
        cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    except ValueError:  # unbalanced quotes
        return None
    if cc[0] is None:
        return None
    try:
        src = _SRC.read_bytes()  # absent from an install that lost its package data: fall back to torch
    except OSError:
        return None
    tag = hashlib.sha256(src + " ".join(_FLAGS).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemm-{tag}.so"
    if out.exists() and not again:
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = tempfile.mkdtemp(dir=out.parent)  # private: the linker creates the .so in it with the umask's mode
    except OSError:  # read-only or missing cache directory
        return None
    tmp = Path(work) / out.name  # not mkstemp's file: its 0600 left the .so 0711, unreadable to other users
    try:
        subprocess.run([*cc, *_FLAGS, "-o", str(tmp), str(_SRC)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: concurrent builders (several shards on one node) all succeed
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _open() -> ctypes.CDLL | None:
    """Build (if needed) and load the kernel; None where it cannot run here."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or platform.system() != "Linux":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2_fma():
        return None
    path = _build()
    lib = _dlopen(path) if path else None
    if lib is None and path:  # a cached .so that does not load (truncated, another libc's): compile it again
        path = _build(again=True)
        lib = _dlopen(path) if path else None
    return lib


def _dlopen(path: Path) -> ctypes.CDLL | None:
    """Load the built kernel and declare its symbols; None when the file does not load or lacks one."""
    try:
        lib = ctypes.CDLL(str(path))
        fns = [getattr(lib, name) for name in _SYMBOLS.values()]
    except (OSError, AttributeError):
        return None
    for fn in fns:
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                _lib = _open() or False
    return _lib or None


def available() -> bool:
    """True when the compiled kernel can be used in this process."""
    return _load() is not None


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear/maybe_linear may take x and w: CPU tensors of one dtype among fp32, bf16 and fp16, contiguous
    weight, kernel built (seg_gemm itself takes x in fp32 whatever w's dtype)."""
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype and w.dtype in _SYMBOLS
            and w.is_contiguous() and available())


def seg_gemm(x: torch.Tensor, w: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
             out: torch.Tensor, checked: bool = False) -> torch.Tensor:
    """out[s:s+c] = x[s:s+c] @ w[e].T for each e with c = counts[e] > 0, s = starts[e].

    x [M, K] fp32 contiguous; w [E, N, K] fp32, bf16 or fp16 contiguous; starts, counts [E] int64 CPU;
    out [M, N] fp32 contiguous (rows of skipped experts are left untouched). Sums are fp32, each in one fixed
    order: a row's result depends on that row and w[e] only (not on c, E or the thread count). Returns out.
    checked: the caller built starts and counts as above, each segment within x's rows (as torch_moe does, from a
    histogram of x's rows): their checks (~20 us, 4x the kernel's time on a decode step's few rows) are skipped;
    the operands' are not.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("seg_gemm: the skinny C kernel is not available here (see cpu_gemm.available())")
    _check_operands(x, w, out)
    num_experts, n, k = w.shape
    if not checked:
        _check_segments(starts, counts, num_experts, x.shape[0])
    getattr(lib, _SYMBOLS[w.dtype])(x.data_ptr(), w.data_ptr(), starts.data_ptr(), counts.data_ptr(),
                                    num_experts, n, k, out.data_ptr(), torch.get_num_threads())
    return out


def _check_segments(starts: torch.Tensor, counts: torch.Tensor, num_experts: int, rows: int) -> None:
    """Raise ValueError unless starts and counts are contiguous int64 CPU tensors [E] whose segments lie within the
    `rows` rows of x and out (the C code reads E int64 of each, raw, and trusts the offsets)."""
    for name, t in (("starts", starts), ("counts", counts)):  # the C code reads E int64 of each, raw
        if t.dtype != torch.int64 or t.device.type != "cpu" or t.shape != (num_experts,) or not t.is_contiguous():
            raise ValueError(f"seg_gemm: {name} must be a contiguous int64 CPU tensor [{num_experts}] (one entry per "
                             f"weight), got {t.dtype} {tuple(t.shape)} on {t.device}, strides {t.stride()}")
    if num_experts:  # offsets the C code trusts: each segment within x's and out's rows (a wrapped end is < 0)
        lo, hi = torch.aminmax(torch.stack((starts, counts, starts + counts)))  # [3, E] -> min, max
        if int(lo) < 0 or int(hi) > rows:
            raise ValueError(f"seg_gemm: starts and counts must give segments within the {rows} rows of x, got "
                             f"starts {starts.tolist()[:16]}, counts {counts.tolist()[:16]}")


def _check_operands(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """Raise ValueError naming the operand unless x [M, K] fp32, w [E, N, K] (fp32/bf16/fp16), out [M, N] fp32 are
    contiguous CPU tensors: the C code trusts these sizes and reads and writes through raw pointers (these were
    asserts, gone under python -O, where a K mismatch read past w)."""
    if (x.is_cpu and w.is_cpu and out.is_cpu and x.dim() == out.dim() == 2 and w.dim() == 3
            and x.dtype == out.dtype == torch.float32 and w.dtype in _SYMBOLS and x.shape[1] == w.shape[2]
            and out.shape == (x.shape[0], w.shape[1]) and x.is_contiguous() and w.is_contiguous()
            and out.is_contiguous()):
        return  # the hot path: one expression, messages only when something is off
    need = {"x": (x, 2, (torch.float32,)), "w": (w, 3, tuple(_SYMBOLS)), "out": (out, 2, (torch.float32,))}
    for name, (t, dims, dtypes) in need.items():
        if t.device.type != "cpu" or t.dim() != dims or t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"seg_gemm: {name} must be a contiguous {dims}-D CPU tensor of "
                             f"{' / '.join(str(d) for d in dtypes)}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")
    if x.shape[1] != w.shape[2]:
        raise ValueError(f"seg_gemm: x {tuple(x.shape)} and w {tuple(w.shape)} disagree on K (x [M, K], w [E, N, K])")
    if tuple(out.shape) != (x.shape[0], w.shape[1]):
        raise ValueError(f"seg_gemm: out {tuple(out.shape)} must be [M, N] = {(x.shape[0], w.shape[1])}")


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[N, K].T -> [M, N] fp32 with the skinny kernel (M small, CPU, w fp32/bf16/fp16)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x {tuple(x.shape)} and w {tuple(w.shape)} must be [M, K] and [N, K]")
    x = x.float().contiguous()  # [M, K]
    start, count = _one_segment(x.shape[0])
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)  # [M, N]
    return seg_gemm(x, w.unsqueeze(0), start, count, out)


@functools.lru_cache(maxsize=None)
def _one_segment(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, counts) [1] int64 for a single weight over `rows` rows; made once per row count (read-only)."""
    return torch.zeros(1, dtype=torch.int64), torch.tensor([rows], dtype=torch.int64)


def maybe_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear(x [M, K], w [N, K], bias) that takes the skinny kernel on CPU (x and w of one dtype) for fp32 with
    M <= MAX_ROWS, and for bf16/fp16 at any M (oneDNN's bf16/fp16 GEMMs on AVX2 are 1.3-6x slower at M = 1-64,
    H = 2048): fp32 sums and bias, one rounding to out_dtype (default x's; float32: the kernel's sums unrounded,
    F.linear's result converted), and each row's bits independent of the others."""
    out_dtype = out_dtype or x.dtype
    rows_ok = x.dim() == 2 and 0 < x.shape[0] and (x.shape[0] <= MAX_ROWS or x.dtype != torch.float32)
    rows_ok = rows_ok and w.dim() == 2 and x.shape[1] == w.shape[1]  # else F.linear (and its error)
    if rows_ok and usable(x, w):
        out = linear(x, w)  # [M, N] fp32
        if bias is not None:
            out.add_(bias)
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    return torch.nn.functional.linear(x, w, bias).to(out_dtype)
