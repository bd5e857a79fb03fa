"""Fused MoE kernels: torch path vs a float64 loop in-process; Triton path under TRITON_INTERPRET=1 in a child.

TRITON_INTERPRET must be set before triton is imported, and other test files may import it first, so
the Triton cases run in one subprocess (`python tests/test_kernels.py --interpret-child`) that prints
JSON results; the parametrized tests below check them case by case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from elasticmoe.kernels import BACKEND_ENV, fused_moe, fused_moe_reference, resolve_backend
from elasticmoe.kernels import align, torch_moe, tuning

REPO = Path(__file__).resolve().parent.parent
TOL_FP32 = 1e-4
TOL_FP16 = 5e-3
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
GRID = [(t, e, k) for t in (1, 3, 37, 130) for e in (1, 5, 8) for k in (1, 2, 3) if k <= e]
SPECIAL = {  # name -> (T, E, k, routing)
    "holes": (37, 8, 2, "holes"),
    "one_expert": (130, 5, 3, "one"),
    "skips": (37, 8, 3, "skip"),
    "all_skipped": (3, 5, 2, "none"),
    "many_experts": (9, 130, 3, "random"),
}


def make_inputs(tokens, experts, top_k, routing="random", dtype=torch.float32, hidden=40, inter=24, seed=0):
    """Random (hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    ids = torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k]  # distinct experts per token
    if routing == "holes":  # only experts 0, 2, 4, ... receive tokens
        ids = torch.rand(tokens, (experts + 1) // 2, generator=g).argsort(1)[:, :top_k] * 2
    elif routing == "one":  # every token on one expert, other slots skipped
        ids[:, 0] = experts // 2
        ids[:, 1:] = -1
    elif routing == "skip":
        ids[torch.rand(tokens, top_k, generator=g) < 0.3] = -1
        ids[-1] = -1
    elif routing == "none":
        ids[:] = -1
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (absolute error when ref is all zeros)."""
    diff = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def _case_id(case) -> str:
    return "T{}-E{}-k{}".format(*case) if isinstance(case, tuple) else case


def _case_inputs(case, **kw):
    if isinstance(case, tuple):
        return make_inputs(*case, **kw)
    t, e, k, routing = SPECIAL[case]
    return make_inputs(t, e, k, routing, **kw)


# ----------------------------------------------------------------------------- torch path (in-process)


@pytest.mark.parametrize("strategy", ["auto", "bmm", "grouped", "segment"])
@pytest.mark.parametrize("case", GRID + list(SPECIAL), ids=_case_id)
def test_torch_path_matches_float64_loop(case, strategy):
    x, w13, w2, ids, weights = _case_inputs(case)
    out = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy=strategy)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= TOL_FP32


def test_public_api_torch_backend_int32_ids_and_low_precision_weights():
    x, w13, w2, ids, weights = make_inputs(37, 8, 2, "skip")
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    out = fused_moe(x, w13, w2, ids.int(), weights, backend="torch")
    assert rel_err(out, ref) <= TOL_FP32
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    ref_b = fused_moe_reference(xb, w13b, w2b, ids, weights.bfloat16())
    out_b = fused_moe(xb, w13b, w2b, ids, weights.bfloat16(), backend="torch")
    assert out_b.dtype == torch.bfloat16 and rel_err(out_b, ref_b) <= 2e-2


def test_empty_batch_returns_zeros():
    x, w13, w2, ids, weights = make_inputs(0, 5, 2)
    for backend in ("auto", "torch", "triton"):  # T=0 never reaches a kernel
        out = fused_moe(x, w13, w2, ids, weights, backend=backend)
        assert out.shape == (0, 40) and out.dtype == x.dtype


def test_input_validation():
    x, w13, w2, ids, weights = make_inputs(3, 5, 2)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, ids[:, :1], weights)
    with pytest.raises(ValueError):
        fused_moe(x, w13, w2, ids, weights, backend="cuda")
    with pytest.raises(ValueError):
        torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy="fast")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", cuda) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit argument wins over the env var
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert resolve_backend("auto", cpu) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "rocm")
    with pytest.raises(ValueError):
        resolve_backend("auto", cpu)


def test_strategy_choice_by_size():
    small = make_inputs(2, 8, 2, hidden=64, inter=32)
    big = make_inputs(1, 8, 2, hidden=512, inter=1024)
    assert torch_moe.pick_strategy(small[0], small[1], small[2], 4) == "bmm"
    assert torch_moe.pick_strategy(small[0], small[1], small[2], 4096) in ("grouped", "segment")
    assert torch_moe.pick_strategy(big[0], big[1], big[2], 2) != "bmm"  # 2 x 6 MiB weight gather
    many = make_inputs(1, 128, 8, hidden=256, inter=128)
    assert torch_moe.pick_strategy(many[0], many[1], many[2], 8) == "segment"  # 8 pairs over 128 experts


@pytest.mark.parametrize("block_m", [16, 64])
def test_torch_alignment_invariants(block_m):
    _, _, _, ids, _ = make_inputs(37, 8, 3, "skip")
    sorted_ids, expert_ids, num_post = align.align_block_size_torch(ids, 8, block_m)
    total, n = int(num_post), ids.numel()
    assert total % block_m == 0 and sorted_ids.numel() == expert_ids.numel() * block_m
    valid = sorted_ids[:total][sorted_ids[:total] < n].long()
    assert sorted(valid.tolist()) == [p for p, e in enumerate(ids.reshape(-1).tolist()) if e >= 0]
    slot_expert = expert_ids.repeat_interleave(block_m)[:total]  # [total]
    flat = ids.reshape(-1)
    keep = sorted_ids[:total] < n
    assert torch.equal(flat[sorted_ids[:total][keep].long()], slot_expert[keep].long())
    assert (expert_ids[total // block_m:] == -1).all() and (sorted_ids[total:] == n).all()


def test_config_lookup_nearest_and_single_warning(monkeypatch, tmp_path, request):
    request.addfinalizer(tuning.clear_cache)
    table = {1: {"BLOCK_M": 16}, 64: {"BLOCK_M": 32}, 1024: {"BLOCK_M": 64}}
    assert [tuning.nearest(table, m)["BLOCK_M"] for m in (1, 20, 40, 500, 5000)] == [16, 16, 32, 32, 64]
    monkeypatch.setattr(tuning, "_warned_default", False)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning.clear_cache()
    (tmp_path / tuning.DEFAULT_FILE).write_text((REPO / "elasticmoe/kernels/configs/default.json").read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))
        tuning.get_config(8, 24, 40, torch.float32, 300, torch.device("cpu"))
    assert len(caught) == 1 and "no tuned MoE config" in str(caught[0].message)
    assert set(first) == set(tuning.CONFIG_KEYS)
    tuned = {"7": dict(SMALL_TILES, BLOCK_M=32)}
    (tmp_path / tuning.config_file_name(8, 24, 40, torch.float32, "cpu")).write_text(json.dumps(tuned))
    tuning.clear_cache()
    assert tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))["BLOCK_M"] == 32


def test_default_configs_compile_on_gpu_shapes():
    table = tuning.load_table(str(tuning.CONFIG_DIR / tuning.DEFAULT_FILE))
    assert table and min(table) == 1
    for cfg in table.values():
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0  # tl.dot tiles: powers of 2, >= 16


# ----------------------------------------------------------------------------- Triton path (interpreter child)

TRITON_CASES = {  # name -> (case, dtype name, tolerance)
    **{f"fp32-{_case_id(c)}": (c, "float32", TOL_FP32) for c in GRID + list(SPECIAL)},
    "fp16-T37-E8-k2": ((37, 8, 2), "float16", TOL_FP16),
    "fp16-T130-E5-k3": ((130, 5, 3), "float16", TOL_FP16),
    "fp16-skips": ("skips", "float16", TOL_FP16),
}
ALIGN_CASES = [(1, 1, 1), (37, 8, 3), (130, 8, 3), (9, 130, 3), "skips", "all_skipped"]


def _child_main() -> None:
    """Run every Triton case under the interpreter and print {name: {...}} as JSON on the last line."""
    lazy = "triton" not in sys.modules  # importing the package must not import triton
    from elasticmoe.kernels.align import align_block_size_torch
    from elasticmoe.kernels.triton_align import align_block_size_triton
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    results = {"lazy_triton_import": {"ok": lazy}}
    for name, (case, dtype_name, tol) in TRITON_CASES.items():
        x, w13, w2, ids, weights = _case_inputs(case, dtype=getattr(torch, dtype_name))
        out = fused_moe_triton(x, w13, w2, ids, weights, config=SMALL_TILES)
        ref = fused_moe_reference(x, w13, w2, ids, weights)
        ref_torch = fused_moe(x.float(), w13.float(), w2.float(), ids, weights, backend="torch")
        errs = {"vs_ref": rel_err(out, ref), "vs_torch": rel_err(out, ref_torch), "dtype": str(out.dtype)}
        results[name] = {**errs, "ok": errs["vs_ref"] <= tol and errs["vs_torch"] <= tol}
    for case in ALIGN_CASES:
        ids = _case_inputs(case)[3]
        for block_m in (16, 64):
            experts = ids.max().item() + 2  # one expert never routed to
            a = align_block_size_torch(ids, experts, block_m)
            b = align_block_size_triton(ids, experts, block_m)
            results[f"align-{_case_id(case)}-bm{block_m}"] = {"ok": all(map(torch.equal, a, b))}
    results.update(_child_torch_alignment_check())
    results.update(_child_api_checks())
    print(json.dumps(results))


def _child_torch_alignment_check() -> dict:
    """The GEMMs fed by the torch-op alignment (the large-batch route) instead of the Triton one."""
    from elasticmoe.kernels import triton_moe

    saved, triton_moe.TRITON_ALIGN_MAX_PAIRS = triton_moe.TRITON_ALIGN_MAX_PAIRS, 0
    x, w13, w2, ids, weights = _case_inputs("skips")
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    err = rel_err(triton_moe.fused_moe_triton(x, w13, w2, ids, weights, config=SMALL_TILES), ref)
    triton_moe.TRITON_ALIGN_MAX_PAIRS = saved
    return {"gemm-after-torch-alignment": {"ok": err <= TOL_FP32, "err": err}}


def _child_api_checks() -> dict:
    """Public API on the triton backend: env-forced auto, int32 ids, default tiles + one warning."""
    os.environ[BACKEND_ENV] = "triton"
    x, w13, w2, ids, weights = make_inputs(5, 5, 2, "skip")
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused_moe(x, w13, w2, ids.int(), weights)  # auto -> triton via the env var, default tiles
        second = fused_moe(x, w13, w2, ids, weights.half(), backend="triton")  # fp16 router weights
    n_warn = sum("no tuned MoE config" in str(w.message) for w in caught)
    return {
        "api-env-forced": {"ok": rel_err(first, ref) <= TOL_FP32, "err": rel_err(first, ref)},
        "api-default-warns-once": {"ok": n_warn == 1 and rel_err(second, ref) <= 1e-3, "warnings": n_warn},
    }


@pytest.fixture(scope="module")
def triton_results():
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret-child"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CHILD_CHECKS = ["lazy_triton_import", "gemm-after-torch-alignment", "api-env-forced", "api-default-warns-once"] + [
    f"align-{_case_id(c)}-bm{b}" for c in ALIGN_CASES for b in (16, 64)
]


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_interpreted_matches_reference_and_torch(triton_results, name):
    result = triton_results[name]
    assert result["ok"], result


@pytest.mark.parametrize("name", CHILD_CHECKS)
def test_triton_interpreted_alignment_and_api(triton_results, name):
    assert triton_results[name]["ok"], triton_results[name]


def test_triton_kernels_compile_for_sm90_without_gpu():
    """Real compiler (bundled ptxas), default tiles: no interpreter-only code, smem fits, no spills."""
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    if not (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("triton wheel without the bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "elasticmoe.kernels.aot_check", "--arch", "90"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compile for sm_90" in proc.stderr and proc.stdout.count("gate_up_kernel") >= 5


if __name__ == "__main__" and "--interpret-child" in sys.argv:
    _child_main()
