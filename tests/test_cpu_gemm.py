"""The skinny AVX2 GEMM (kernels/cpu_gemm.c) against float64 torch products, and the MoE/linear paths using it."""

from __future__ import annotations

import os
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch

from elasticmoe.kernels import cpu_gemm, torch_moe
from tests.cpu_kernel_util import compile_errors, needs_kernel



def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@needs_kernel
def test_the_kernel_builds_wherever_it_can_run():
    """Where the machine can run the kernel, it is built and used: a cpu_gemm.c that failed to compile made
    available() False, which skipped every test of the kernel and left the CPU path on torch without a word."""
    assert cpu_gemm.available(), f"cpu_gemm.c does not build here:\n{compile_errors()}"


@needs_kernel
@pytest.mark.parametrize("n,k", [(1, 1), (7, 9), (33, 64), (130, 77), (256, 513)])
def test_seg_gemm_matches_float64(n, k):
    """Odd N (weight-row pairs), K not a multiple of 8 (vector tail), 0..20 rows per expert, empty experts."""
    torch.manual_seed(n * 1000 + k)
    counts = [0, 1, 2, 3, 4, 5, 0, 8, 13, 16, 17, 20]  # > MAX_ROWS is allowed in seg_gemm itself
    starts = [sum(counts[:i]) for i in range(len(counts))]
    x = torch.randn(sum(counts), k)  # [M, K]
    w = torch.randn(len(counts), n, k)  # [E, N, K]
    out = torch.full((x.shape[0], n), float("nan"))  # [M, N]
    cpu_gemm.seg_gemm(x, w, torch.tensor(starts), torch.tensor(counts), out)
    for e, (s, c) in enumerate(zip(starts, counts)):
        if c:
            assert rel_err(out[s:s + c], x[s:s + c].double() @ w[e].double().T) < 1e-5, (e, c)


@needs_kernel
def test_seg_gemm_leaves_skipped_rows_untouched():
    x, w = torch.randn(6, 24), torch.randn(3, 10, 24)
    out = torch.full((6, 10), 7.0)
    cpu_gemm.seg_gemm(x, w, torch.tensor([0, 2, 4]), torch.tensor([2, 0, 2]), out)
    assert torch.equal(out[2:4], torch.full((2, 10), 7.0))
    assert rel_err(out[4:], x[4:].double() @ w[2].double().T) < 1e-5


@needs_kernel
def test_seg_gemm_refuses_malformed_segments():
    """The C code reads E int64 starts and counts through raw pointers: fewer entries, another int dtype or a
    strided view made it read past them (garbage rows, out-of-bounds x / out); each is now a ValueError."""
    x, w = torch.randn(6, 24), torch.randn(3, 10, 24)
    starts, counts = torch.tensor([0, 2, 4]), torch.tensor([2, 0, 2])
    every_other = torch.tensor([0, 9, 2, 9, 4, 9])[::2]  # right values, stride 2
    bad = {"short starts": (starts[:2], counts), "short counts": (starts, counts[:2]),
           "int32 counts": (starts, counts.int()), "strided starts": (every_other, counts),
           "2-D counts": (starts, counts[None]), "long starts": (torch.tensor([0, 2, 4, 6]), counts)}
    for case, (s, c) in bad.items():
        out = torch.full((6, 10), 7.0)
        with pytest.raises(ValueError, match="contiguous int64 CPU tensor \\[3\\]"):
            cpu_gemm.seg_gemm(x, w, s, c, out)
        assert torch.equal(out, torch.full((6, 10), 7.0)), case  # nothing written
    out = torch.full((6, 10), 7.0)
    cpu_gemm.seg_gemm(x, w, every_other.contiguous(), counts, out)  # the same call, well formed: runs
    assert rel_err(out[:2], x[:2].double() @ w[0].double().T) < 1e-5


@needs_kernel
@pytest.mark.parametrize("starts,counts", [
    ([0, 2, 5], [2, 0, 2]),  # rows 5..6 of 6: past x and out
    ([0, 2, -1], [2, 0, 2]),  # a negative start: before them
    ([0, 2, 4], [2, -1, 2]),  # a negative count
    ([0, 2, 2 ** 62], [2, 0, 2 ** 62]),  # the end wraps past int64 to a negative number
])
def test_seg_gemm_refuses_segments_past_the_rows(starts, counts):
    """The C code trusts starts and counts as row offsets into x and out [M]: a segment not within 0..M made it
    read and write out of bounds; now a ValueError naming them, nothing written."""
    x, w = torch.randn(6, 24), torch.randn(3, 10, 24)
    out = torch.full((6, 10), 7.0)
    with pytest.raises(ValueError, match="seg_gemm: starts and counts"):
        cpu_gemm.seg_gemm(x, w, torch.tensor(starts), torch.tensor(counts), out)
    assert torch.equal(out, torch.full((6, 10), 7.0))
    cpu_gemm.seg_gemm(x, w, torch.tensor([0, 2, 6]), torch.tensor([2, 0, 0]), out)  # an empty one at M: fine


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_maybe_linear_matches_torch(rows):
    x, w, b = torch.randn(rows, 72), torch.randn(50, 72), torch.randn(50)
    ref = x.double() @ w.double().T + b.double()
    assert rel_err(cpu_gemm.maybe_linear(x, w, b), ref) < 1e-5
    assert rel_err(cpu_gemm.maybe_linear(x[:, :64], w[:, :64]), x[:, :64].double() @ w[:, :64].double().T) < 1e-5
    assert cpu_gemm.maybe_linear(x.unsqueeze(0), w, b).shape == (1, rows, 50)  # 3-D goes to F.linear


def test_maybe_linear_falls_back_for_other_dtypes():
    x, w = torch.randn(4, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    assert torch.allclose(cpu_gemm.maybe_linear(x, w), x @ w.T)
    assert not cpu_gemm.usable(x, w)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_segment_moe_same_with_and_without_kernel(tokens, monkeypatch):
    """The segment strategy through the C kernel (segments <= 16 rows) and MKL (longer) equals the torch loop."""
    torch.manual_seed(tokens)
    experts, top_k, hidden, inter = 6, 2, 40, 24
    x = torch.randn(tokens, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) / 6, torch.randn(experts, hidden, inter) / 5
    ids = torch.randint(0, experts, (tokens, top_k))
    ids[0, 1] = -1  # routed off this shard
    weights = torch.rand(tokens, top_k)
    fast = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy="segment")
    monkeypatch.setattr(cpu_gemm, "_lib", False)
    assert not cpu_gemm.available()
    slow = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy="segment")
    assert rel_err(fast, slow.double()) < 1e-5


def test_env_switch_disables_kernel(monkeypatch):
    """ELASTICMOE_CPU_GEMM=0, read when the kernel is first wanted (a process's first available()): checked in this
    process with the kernel not yet loaded, as a fresh process has it (a subprocess spent ~2.5 s importing torch)."""
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    assert not cpu_gemm.available()


@needs_kernel
def test_unloadable_cached_library_is_built_again(monkeypatch, tmp_path):
    """A cached .so that does not load (here truncated; also one built against another libc on a shared cache)
    made every call of the CPU MoE path raise OSError; it is now compiled again, and the kernel used."""
    built = cpu_gemm._build()  # the session's cache, built once: its name only (not compiled again in tmp_path)
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path))
    cached = tmp_path / "cpu_gemm" / built.name
    cached.parent.mkdir()
    cached.write_bytes(b"\x7fELF")
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    assert cpu_gemm.available()
    assert cached.stat().st_size > 1000  # rebuilt in place
    x, w = torch.randn(3, 24), torch.randn(10, 24)
    assert rel_err(cpu_gemm.linear(x, w), x.double() @ w.double().T) < 1e-5


@needs_kernel
def test_built_library_is_readable_by_other_users(monkeypatch, tmp_path):
    """The .so was compiled into a mkstemp file (mode 0600), which the linker only made executable: 0711, so on a
    cache shared by several users (ELASTICMOE_CACHE on a node's shared disk) the others could not dlopen it and
    fell back to torch, or rebuilt it over the owner's. Now it has the mode `cc -o` gives under the umask (0755
    under 022), and no build folder is left behind."""
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path))
    umask = os.umask(0o022)
    try:
        built = cpu_gemm._build()
    finally:
        os.umask(umask)
    assert built is not None and built.parent == tmp_path / "cpu_gemm"
    assert oct(built.stat().st_mode & 0o777) == oct(0o755)
    assert [p.name for p in built.parent.iterdir()] == [built.name]
    lib = cpu_gemm._dlopen(built)
    assert lib is not None and all(hasattr(lib, name) for name in cpu_gemm._SYMBOLS.values())


@needs_kernel
def test_cc_with_arguments_builds_the_kernel(tmp_path, monkeypatch):
    """CC holding a command line ("gcc -m64", "ccache cc": the make / autoconf convention) was run as one file
    name, failed, and left the process on torch silently; it is now split like a shell would. Built into an empty
    cache by this process's first available() (a subprocess spent ~2.5 s importing torch)."""
    cc = subprocess.run(["sh", "-c", "command -v cc || command -v gcc"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setenv("CC", f"{cc} -m64")
    monkeypatch.setenv("ELASTICMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    assert cpu_gemm.available()
    assert [p.suffix for p in (tmp_path / "cpu_gemm").iterdir()] == [".so"]  # built with that CC, not found cached


@needs_kernel
def test_seg_gemm_names_each_bad_operand():
    """The C code trusts x [M, K], w [E, N, K] and out [M, N] through raw pointers; they were checked by asserts
    (a bare AssertionError, and nothing at all under python -O). Now a ValueError naming the operand."""
    x, w, out = torch.randn(4, 24), torch.randn(2, 10, 24), torch.zeros(4, 10)
    starts, counts = torch.tensor([0, 2]), torch.tensor([2, 2])
    bad = {
        "x must be a contiguous 2-D CPU tensor of torch.float32, got torch.float64": dict(x=x.double()),
        "x must be a contiguous 2-D CPU tensor": dict(x=torch.randn(24, 4).t()),
        "w must be a contiguous 3-D CPU tensor": dict(w=w[0]),
        "w must be a contiguous 3-D": dict(w=torch.randn(2, 24, 10).transpose(1, 2)),
        "x (4, 24) and w (2, 10, 32) disagree on K": dict(w=torch.randn(2, 10, 32)),
        "out (4, 9) must be [M, N] = (4, 10)": dict(out=torch.zeros(4, 9)),
        "out must be a contiguous 2-D CPU tensor of torch.float32, got torch.bfloat16": dict(
            out=torch.zeros(4, 10, dtype=torch.bfloat16)),
        "x must be a contiguous 2-D CPU tensor of torch.float32, got torch.float32 (4, 24) on meta": dict(
            x=torch.empty(4, 24, device="meta")),  # a device pointer handed to C
    }
    for fragment, change in bad.items():
        args = {"x": x, "w": w, "out": out, **change}
        with pytest.raises(ValueError, match=re.escape(fragment)):
            cpu_gemm.seg_gemm(args["x"], args["w"], starts, counts, args["out"])
    with pytest.raises(ValueError, match=re.escape("linear: x (4, 24) and w (10, 32) must be [M, K] and [N, K]")):
        cpu_gemm.linear(x, torch.randn(10, 32))


def _compiled_as_python_O(module):
    """A fresh copy of `module` compiled as `python -O` compiles it (optimize=1: asserts and `if __debug__` blocks
    gone). kernels/ imports nothing else of the package, so this is all of the kernel's Python that -O changes; a
    `python -O` subprocess byte-compiled all of torch again (no opt-1 .pyc in the venv): ~6 s of CPU."""
    path = Path(module.__file__)
    optimized = types.ModuleType(module.__name__ + "_O")
    optimized.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec", optimize=1), optimized.__dict__)
    return optimized


@needs_kernel
def test_operand_checks_hold_under_python_O():
    """Under python -O the asserts were gone: maybe_linear(x [2, 16], w [8, 64]) read 48 floats past each row of x
    and returned garbage, seg_gemm likewise. Now F.linear's shape error, and seg_gemm's ValueError."""
    exec(compile("assert False", "<probe>", "exec", optimize=1))  # optimize=1 strips asserts, as -O does
    kernel = _compiled_as_python_O(cpu_gemm)
    assert kernel.available() and kernel._lib is not cpu_gemm._lib  # the copy's own load of the kernel
    x, w = torch.randn(2, 16), torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        kernel.maybe_linear(x, w)
    with pytest.raises(ValueError, match="disagree on K"):
        kernel.seg_gemm(x, w[None], torch.tensor([0]), torch.tensor([2]), torch.empty(2, 8))
