"""Fused MoE kernels: torch path vs a float64 loop in-process; Triton path under TRITON_INTERPRET=1 in a child.

TRITON_INTERPRET must be set before triton is imported, and other test files may import it first, so
the Triton cases run in one subprocess (`python tests/test_kernels.py --triton-child cpu`) that prints
JSON results; the parametrized tests below check them case by case. On a CUDA machine the same cases
also run on the GPU (`--triton-child cuda`, bf16 and fp32; `make gpu-check`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from elasticmoe.kernels import BACKEND_ENV, check_moe_inputs, fused_moe, fused_moe_reference, resolve_backend
from elasticmoe.kernels import align, torch_moe, tuning
from tests.triton_child import run_child

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


def test_config_lookup_tuned_file_per_gpu_dir_and_single_warning(monkeypatch, tmp_path, request):
    request.addfinalizer(tuning.clear_cache)
    table = {1: {"BLOCK_M": 16}, 64: {"BLOCK_M": 32}, 1024: {"BLOCK_M": 64}}
    assert [tuning.nearest(table, m)["BLOCK_M"] for m in (1, 20, 40, 500, 5000)] == [16, 16, 32, 32, 64]
    monkeypatch.setattr(tuning, "_warned_default", False)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    tuning.clear_cache()
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
    assert tuning.candidate_configs(8, 24, 40, torch.float32, torch.device("cpu")) == [dict(SMALL_TILES, BLOCK_M=32)]


def test_default_tiles_follow_shape_fit_consumer_smem():
    def config(tokens, experts, top_k, dtype=torch.bfloat16):
        return tuning.finalize(tuning.default_tiles(tokens * top_k / experts), 2048, 7168, dtype, tuning.CONSUMER_SMEM)

    assert config(1, 256, 8)["BLOCK_N"] == 32 and config(1, 256, 8)["BLOCK_M"] == 16  # decode streams weights
    assert config(2048, 8, 2)["BLOCK_M"] == 128 and config(2048, 256, 8)["BLOCK_M"] == 64  # same T, other E, k
    for _, cfg in tuning.DEFAULT_TILES:
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0  # tl.dot tiles: powers of 2, >= 16
        assert tuning.smem_bytes(cfg, 2) <= tuning.CONSUMER_SMEM  # sm_89 / sm_120
    big = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 5}
    fitted = tuning.finalize(big, 2048, 7168, torch.bfloat16, tuning.CONSUMER_SMEM)
    assert tuning.smem_bytes(big, 2) > tuning.CONSUMER_SMEM >= tuning.smem_bytes(fitted, 2)
    assert fitted["num_stages"] >= 2 and fitted["BLOCK_M"] == 64


def test_input_checks_name_each_bad_argument():
    x, w13, w2, ids, weights = make_inputs(3, 5, 2)
    meta = torch.device("meta")
    bad = {  # message fragment -> arguments
        "w13 (torch.float16) and w2 (torch.bfloat16)": (x, w13.half(), w2.bfloat16(), ids, weights),
        "topk_ids must be int32 or int64": (x, w13, w2, ids.to(torch.int16), weights),
        "topk_ids must be int32 or int64, got torch.float32": (x, w13, w2, ids.float(), weights),
        "topk_weights must be float32": (x, w13, w2, ids, weights.to(torch.int64)),
        "hidden must be float32": (x.to(torch.int32), w13, w2, ids, weights),
        "one device": (x, w13, w2, ids.to(meta), weights),
        "w13 must have a unit last stride": (x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, ids, weights),
        "w2 must have a unit last stride": (x, w13, w2.transpose(1, 2).contiguous().transpose(1, 2), ids, weights),
        "hidden must have a unit last stride": (x.t().contiguous().t(), w13, w2, ids, weights),
        "weight shapes": (x, w13, w2.transpose(1, 2), ids, weights),
        "must both be": (x, w13, w2, ids[:, :1], weights),
    }
    for fragment, args in bad.items():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            check_moe_inputs(*args)
        with pytest.raises(ValueError, match=re.escape(fragment)):
            fused_moe(*args, backend="torch")
    check_moe_inputs(x, w13, w2, ids.int(), weights.bfloat16())  # int32 ids, low-precision weights: fine


def test_device_guard_selects_the_tensors_cuda_device():
    from elasticmoe.kernels.triton_moe import device_guard  # triton imported: no kernel runs in this process

    guard = device_guard(torch.device("cuda", 1))  # built without touching CUDA; entered by fused_moe_triton
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)


def test_triton_env_set_by_package(monkeypatch):
    import elasticmoe.kernels as kernels

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    monkeypatch.setenv("ELASTICMOE_CACHE", "/tmp/emoe-x")
    kernels._triton_env()  # what importing the package runs
    assert os.environ["TRITON_CACHE_DIR"] == "/tmp/emoe-x/triton" and os.environ["TRITON_DEFAULT_FP_FUSION"] == "1"
    monkeypatch.setenv("TRITON_CACHE_DIR", "/tmp/mine")
    kernels._triton_env()
    assert os.environ["TRITON_CACHE_DIR"] == "/tmp/mine"  # env-overridable


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "benchmarks" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_routing_bytes_and_grouped_mm_baseline():
    bench = _bench_module()
    shape = (16, 32, 48, 2, 8)  # route over 16 experts, this shard holds 0..7
    g = torch.Generator().manual_seed(0)
    ids, local_ids, weights = bench.route(20, shape, torch.device("cpu"), g)
    assert torch.equal(local_ids, torch.where(ids < 8, ids, -1)) and (ids >= 8).any() and (ids < 8).any()
    assert torch.allclose(weights.sum(-1), torch.ones(20)) and (ids.sort(1).values.diff(1) > 0).all()
    one = torch.tensor([[3, -1], [3, 5]])  # experts 3 and 5 hit; padded rows 16 + 16
    counted = bench.bytes_moved(shape, 2, one, 2)
    assert counted["min"] == 2 * 3 * 32 * 48 * 2 + 2 * 2 * 32 * 2 + 4 * 12 and counted["padded_rows"] == 32
    align = 4 * 8 * 2 + 3 * 1 * 16 * 4 + 32 * 4 * 3 + 2 * 4 * 2
    assert counted["ours"] - counted["min"] == 3 * 32 * 2 + 2 * 32 * 48 * 2 + 2 * 3 * 32 * 4 + align
    x, w13, w2, _, _ = make_inputs(20, 8, 2, hidden=32, inter=48)
    run, order = bench.grouped_mm_only(x, w13, w2, local_ids)
    y = run().float() * weights.reshape(-1)[order][:, None]
    out = torch.zeros(20, 32).index_add_(0, order // 2, y)
    assert rel_err(out, fused_moe_reference(x, w13, w2, local_ids, weights)) <= TOL_FP32
    assert rel_err(bench.reference(x, w13, w2, local_ids, weights), out) <= TOL_FP32
    plan = bench.dry_run({"deepseek-v3-e256": bench.MODELS["deepseek-v3-e256"]}, [4])
    assert plan[0]["w13_elements"] > 2**31 and plan[0]["local_slots"] == 32 and plan[0]["ours"] > plan[0]["min"]
    rows = [{"model": "m", "tokens": 16, "impl": "elasticmoe-triton", "us_graph": 10.0, "pct_peak_bw": 75.0,
             "experts_hit": 3},
            {"model": "m", "tokens": 256, "impl": "elasticmoe-triton", "us": 10.0, "pct_peak_bw": 20.0},
            {"model": "m", "tokens": 256, "impl": "torch._grouped_mm-only", "us": 9.0}]
    summary = bench.summarize(rows)
    assert summary[0]["bw_ok"] and not summary[1]["grouped_ok"] and summary[1]["vs_grouped_mm"] == 0.9


# ----------------------------------------------------------------------------- Triton path (child process)

TRITON_GRID = [c for c in GRID if c[0] < 130] + [(130, 8, 3)]  # the interpreter's cost grows with T
TRITON_CASES = {  # name -> (case, dtype name, tolerance)
    **{f"fp32-{_case_id(c)}": (c, "float32", TOL_FP32) for c in TRITON_GRID + list(SPECIAL)},
    "fp16-T37-E8-k2": ((37, 8, 2), "float16", TOL_FP16),
    "fp16-T130-E5-k3": ((130, 5, 3), "float16", TOL_FP16),
    "fp16-skips": ("skips", "float16", TOL_FP16),
}
ALIGN_CASES = [(1, 1, 1), (37, 8, 3), (130, 8, 3), (9, 130, 3), "skips", "all_skipped"]
ALIGN_LARGE = {"T1024-E256-k8-bm64": (1024, 256, 8, 64, "random"), "T512-E256-k8-skip-bm16": (512, 256, 8, 16, "skip"),
               "T1-E256-k8-bm16": (1, 256, 8, 16, "random")}  # up to N = 8192 slots
CHILD_CHECKS = ["lazy_triton_import", "api-env-forced", "api-default-warns-once", "chunked-equals-unchunked",
                "chunk-env", "no-compile-after-load", "compile-counter-sees-new-config"] + [
    f"align-{_case_id(c)}-bm{b}" for c in ALIGN_CASES for b in (16, 64)] + [f"align-{n}" for n in ALIGN_LARGE]


def _child_main(device: str = "cpu") -> None:
    """Run every Triton case (interpreter on CPU, real kernels on CUDA); print {name: {...}} as JSON last."""
    lazy = "triton" not in sys.modules  # importing the package must not import triton
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    results = {"lazy_triton_import": {"ok": lazy}}
    dtypes = {"float16": "float16"} if device == "cpu" else {"float16": "bfloat16"}  # GPU: bf16 instead of fp16
    for name, (case, dtype_name, tol) in TRITON_CASES.items():
        dtype_name = dtypes.get(dtype_name, dtype_name)
        tol = 2e-2 if dtype_name == "bfloat16" else tol
        x, w13, w2, ids, weights = (t.to(device) for t in _case_inputs(case, dtype=getattr(torch, dtype_name)))
        out = fused_moe_triton(x, w13, w2, ids, weights, config=SMALL_TILES)
        ref = fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), weights.cpu())
        errs = {"vs_ref": rel_err(out.cpu(), ref), "dtype": str(out.dtype)}
        results[name] = {**errs, "ok": errs["vs_ref"] <= tol and out.dtype == x.dtype}
    results.update(_child_alignment(device))
    results.update(_child_chunking(device))
    results.update(_child_api_checks(device))
    results.update(_child_no_compile(device))
    print(json.dumps(results))


def _child_alignment(device) -> dict:
    """Multi-program Triton alignment == the torch twin, bit for bit, small and large (E=256, N=8192)."""
    from elasticmoe.kernels.align import align_block_size_torch
    from elasticmoe.kernels.triton_align import align_block_size_triton

    results = {}
    for case in ALIGN_CASES:
        ids = _case_inputs(case)[3].to(device)
        for block_m in (16, 64):
            experts = ids.max().item() + 2  # one expert never routed to
            a = align_block_size_torch(ids, experts, block_m)
            b = align_block_size_triton(ids, experts, block_m)
            results[f"align-{_case_id(case)}-bm{block_m}"] = {"ok": all(map(torch.equal, a, b))}
    for name, (tokens, experts, top_k, block_m, routing) in ALIGN_LARGE.items():
        ids = make_inputs(tokens, experts, top_k, routing, hidden=16, inter=16)[3].to(device)
        a = align_block_size_torch(ids, experts, block_m)
        b = align_block_size_triton(ids.int(), experts, block_m)
        results[f"align-{name}"] = {"ok": all(map(torch.equal, a, b)), "padded": int(a[2])}
    return results


def _child_chunking(device) -> dict:
    """pair_out bounded by chunks of tokens: chunked == unchunked, and the env var sets the chunk."""
    from elasticmoe.kernels import triton_moe

    x, w13, w2, ids, weights = (t.to(device) for t in _case_inputs("skips"))
    whole = triton_moe.fused_moe_triton(x, w13, w2, ids, weights, config=SMALL_TILES)
    parts = triton_moe.fused_moe_triton(x, w13, w2, ids, weights, config=SMALL_TILES, chunk_tokens=8)  # 5 chunks
    ref = fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), weights.cpu())
    err = rel_err(parts.cpu(), whole.cpu())
    os.environ[triton_moe.CHUNK_ENV] = "5"
    from_env = triton_moe.chunk_tokens_default()
    os.environ[triton_moe.CHUNK_ENV] = "zero"
    try:
        triton_moe.chunk_tokens_default()
        bad_rejected = False
    except ValueError as exc:
        bad_rejected = triton_moe.CHUNK_ENV in str(exc)
    del os.environ[triton_moe.CHUNK_ENV]
    return {"chunked-equals-unchunked": {"ok": err <= 1e-6 and rel_err(parts.cpu(), ref) <= TOL_FP32, "err": err},
            "chunk-env": {"ok": from_env == 5 and bad_rejected}}


def _child_api_checks(device) -> dict:
    """Public API on the triton backend: env-forced auto, int32 ids, default tiles + one warning."""
    os.environ[BACKEND_ENV] = "triton"
    x, w13, w2, ids, weights = (t.to(device) for t in make_inputs(5, 5, 2, "skip"))
    ref = fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), weights.cpu())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fused_moe(x, w13, w2, ids.int(), weights)  # auto -> triton via the env var, default tiles
        second = fused_moe(x, w13, w2, ids, weights.half(), backend="triton")  # fp16 router weights
    del os.environ[BACKEND_ENV]
    n_warn = sum("no tuned MoE config" in str(w.message) for w in caught)
    return {
        "api-env-forced": {"ok": rel_err(first.cpu(), ref) <= TOL_FP32, "err": rel_err(first.cpu(), ref)},
        "api-default-warns-once": {"ok": n_warn == 1 and rel_err(second.cpu(), ref) <= 1e-3, "warnings": n_warn},
    }


def _record_jit_keys() -> dict[str, set]:
    """Record, per kernel, the JIT cache key Triton's own launcher computes for each launch (sm_90 backend).

    Triton's launcher compiles exactly when it meets a key it has not seen (JITFunction.run:
    compute_cache_key over the binder's specialisation and options). The interpreter never compiles, so
    each launch is wrapped (then run as usual) to feed its real arguments to that same binder.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    from elasticmoe.kernels import triton_align, triton_gemm

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys: dict[str, set] = {}
    kernels = [triton_align.align_count_kernel, triton_align.align_scan_kernel, triton_align.align_place_kernel,
               triton_gemm.gate_up_kernel, triton_gemm.down_kernel, triton_gemm.topk_sum_kernel]
    for kernel in kernels:
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        launch = kernel.run

        def run(*args, grid, warmup, _name=kernel.__name__, _binder=binder, _launch=launch, **kwargs):
            _, specialization, options = _binder(*args, **kwargs)
            keys.setdefault(_name, set()).add(compute_cache_key({}, specialization, options))
            return _launch(*args, grid=grid, warmup=warmup, **kwargs)

        kernel.run = run
    return keys


def _compiled_count() -> int:
    """Real compiled-kernel count in Triton's in-memory caches (CUDA only)."""
    from elasticmoe.kernels import triton_align, triton_gemm

    kernels = [triton_align.align_count_kernel, triton_align.align_scan_kernel, triton_align.align_place_kernel,
               triton_gemm.gate_up_kernel, triton_gemm.down_kernel, triton_gemm.topk_sum_kernel]
    return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())


def _child_no_compile(device) -> dict:
    """Load a tiny model's experts on the triton backend, then serve a mix of batch sizes: no new JIT key."""
    import tempfile

    from elasticmoe.kernels import triton_moe
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore
    from elasticmoe.model.tiny import make_tiny_model

    keys = _record_jit_keys()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        files = open_model(str(make_tiny_model("qwen3_moe", Path(tmp) / "m", layers=2, experts=8)))
        store = ExpertStore(files.ckpt, files.names, files.spec, dtype, torch.device(device), backend="triton")
        layers = files.spec.moe.moe_layers
        store.load([(layer, e) for layer in layers for e in range(files.spec.moe.num_experts)])
    after_load = {name: set(k) for name, k in keys.items()}
    compiled = _compiled_count() if device == "cuda" else None
    g = torch.Generator().manual_seed(1)
    moe, hidden_size = files.spec.moe, files.spec.hidden_size
    worst = 0.0
    for tokens in (1, 2, 5, 17, 64, 130):
        x = torch.randn(tokens, hidden_size, generator=g).to(dtype)
        ids = torch.rand(tokens, moe.num_experts, generator=g).argsort(1)[:, :moe.top_k]
        ids[torch.rand(tokens, moe.top_k, generator=g) < 0.2] = -1  # experts held elsewhere
        weights = torch.rand(tokens, moe.top_k, generator=g)
        out = store.forward(layers[-1], x.to(device), ids.to(device), weights.to(device))
        le = store.layers[layers[-1]]
        ref = fused_moe_reference(x, le.w13.cpu(), le.w2.cpu(), ids, weights)
        worst = max(worst, rel_err(out.cpu(), ref))
    served = {name: set(k) for name, k in keys.items()}
    new = {name: len(served[name] - after_load.get(name, set())) for name in served}
    result = {"ok": sum(new.values()) == 0 and len(after_load) == 6 and worst <= (TOL_FP32 if device == "cpu" else 2e-2),
              "keys_after_load": {n: len(k) for n, k in after_load.items()}, "new_keys": new, "err": worst}
    if device == "cuda":
        result["compiled_after_load"], result["compiled_after_serving"] = compiled, _compiled_count()
        result["ok"] = result["ok"] and compiled == result["compiled_after_serving"]
    odd = dict(SMALL_TILES, BLOCK_N=16)  # a config no warm-up compiled: the counter must see it
    le = store.layers[layers[-1]]
    triton_moe.fused_moe_triton(x.to(device), le.w13, le.w2, ids.to(device), weights.to(device), config=odd)
    fresh = sum(len(keys[n] - served[n]) for n in served)
    return {"no-compile-after-load": result, "compile-counter-sees-new-config": {"ok": fresh == 2, "new": fresh}}


def _run_child(device: str) -> dict:
    return run_child(__file__, "--triton-child", device)


@pytest.fixture(scope="module")
def triton_results():
    return _run_child("cpu")


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_interpreted_matches_reference(triton_results, name):
    result = triton_results[name]
    assert result["ok"], result


@pytest.mark.parametrize("name", CHILD_CHECKS)
def test_triton_interpreted_alignment_chunking_api_compiles(triton_results, name):
    assert triton_results[name]["ok"], triton_results[name]


CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cuda_results():
    return _run_child("cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (make gpu-check)")
@pytest.mark.parametrize("name", list(TRITON_CASES) + CHILD_CHECKS)
def test_triton_on_cuda_bf16_and_fp32(cuda_results, name):
    assert cuda_results[name]["ok"], cuda_results[name]


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_launches_on_the_tensors_device():
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    x, w13, w2, ids, weights = (t.to("cuda:1") for t in make_inputs(37, 8, 2, dtype=torch.bfloat16))
    with torch.cuda.device(0):
        out = fused_moe_triton(x, w13, w2, ids, weights)
    torch.cuda.synchronize(1)
    assert rel_err(out.cpu(), fused_moe_reference(x.cpu(), w13.cpu(), w2.cpu(), ids.cpu(), weights.cpu())) <= 2e-2


def test_triton_kernels_compile_for_sm90_without_gpu():
    """Real compiler (bundled ptxas), default tiles: no interpreter-only code, smem fits, no spills."""
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    if not (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").is_file():
        pytest.skip("triton wheel without the bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "elasticmoe.kernels.aot_check", "--arch", "90"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compile for sm_90" in proc.stderr and proc.stdout.count("gate_up_kernel") >= 5
    assert proc.stdout.count("align_place_kernel") == 2


if __name__ == "__main__" and "--triton-child" in sys.argv:
    _child_main(sys.argv[sys.argv.index("--triton-child") + 1])
