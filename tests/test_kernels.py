"""Fused MoE kernels, torch path: against a float64 loop, in-process (the Triton path: test_kernels_triton.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings

import pytest
import torch

from elasticmoe.kernels import BACKEND_ENV, check_moe_inputs, fused_moe, fused_moe_reference, resolve_backend
from elasticmoe.kernels import align, torch_moe, tuning
from tests.moe_cases import GRID, REPO, SMALL_TILES, SPECIAL, TOL_FP32, _case_id, _case_inputs, make_inputs, rel_err

# ----------------------------------------------------------------------------- torch path (in-process)


@pytest.mark.parametrize("strategy", ["auto", "bmm", "grouped", "segment"])
@pytest.mark.parametrize("case", GRID + list(SPECIAL), ids=_case_id)
def test_torch_path_matches_float64_loop(case, strategy):
    x, w13, w2, ids, weights = _case_inputs(case)
    out = torch_moe.fused_moe_torch(x, w13, w2, ids, weights, strategy=strategy)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= TOL_FP32


@pytest.mark.parametrize("strategy", ["auto", "bmm", "grouped", "segment"])
@pytest.mark.parametrize("hidden,inter,dtype", [(7, 5, torch.float32), (36, 20, torch.bfloat16), (1, 2, torch.float16)])
def test_torch_strategies_take_sizes_off_16_bytes(strategy, hidden, inter, dtype):
    """grouped_mm needs 16-byte row strides: "grouped" raised RuntimeError for H or I not a multiple of 16 bytes
    (fp32 H=7, bf16 H=36); it now runs those shapes as "segment" does (the same numbers)."""
    x, w13, w2, ids, weights = make_inputs(33, 4, 2, "skip", hidden=hidden, inter=inter)
    ref = fused_moe_reference(x.to(dtype).float(), w13.to(dtype).float(), w2.to(dtype).float(), ids, weights)
    out = torch_moe.fused_moe_torch(x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights, strategy=strategy)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) <= (TOL_FP32 if dtype == torch.float32 else 2e-2)


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


def test_shard_without_experts_returns_zeros():
    """E = 0 (no expert of the layer held here, every id skipped): zeros, as the torch twin gives, from every
    backend; the Triton path divided by E when picking its tiles (ZeroDivisionError)."""
    x, w13, w2, ids, weights = make_inputs(5, 3, 2)
    ids[:] = -1
    ref = torch_moe.fused_moe_torch(x, w13[:0], w2[:0], ids, weights)
    assert torch.equal(ref, torch.zeros_like(x))
    for backend in ("torch", "triton"):  # E=0 never reaches a kernel either
        out = fused_moe(x, w13[:0], w2[:0], ids, weights, backend=backend, out_dtype=torch.float64)
        assert out.dtype == torch.float64 and torch.equal(out, ref.double())


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
        "w2 (5, 24, 40) does not match w13": (x, w13, w2.transpose(1, 2), ids, weights),
        "topk_weights (3, 2) must have topk_ids' shape (3, 1)": (x, w13, w2, ids[:, :1], weights),
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


def test_benchmark_smoke_runs_every_stage(tmp_path):
    """`benchmarks/kernels.py --smoke` (the Triton interpreter, tiny shapes) runs every row a GPU run would,
    the per-kernel split included: a stale call into the kernels fails here, not on a leased GPU. One timed run
    after the warm-up (--cpu-runs 1): each interpreted launch takes up to seconds, and the times mean nothing."""
    import subprocess
    import sys

    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--cpu-runs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cpu"] and report["cpus"] > 0, report.keys()  # the host beside the device
    assert report["args"]["cpu_runs"] == 1, report["args"]
    rows = report["rows"]
    timed = [r for r in rows if "us" in r]
    assert {r["impl"] for r in timed} >= {"elasticmoe-triton", "elasticmoe-torch", "torch._grouped_mm-only"}
    assert all(r["err"] <= 1e-4 for r in timed), [(r["impl"], r["err"]) for r in timed]
    splits = [r["split_us"] for r in rows if r["impl"] == "elasticmoe-triton-split"]
    assert len(splits) == 2 and all(set(s) == {"align", "gate_up", "down", "topk_sum"} for s in splits), splits


def test_tune_moe_smoke_writes_a_table_the_lookup_uses(tmp_path, monkeypatch):
    """`benchmarks/tune_moe.py --smoke` (interpreter, 3 configs, 2 token counts, one run each) writes a table
    under the name tuning looks for, and get_config then returns its configs: the tuning path works before a GPU
    lease."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", tuning.CONFIG_DIR_ENV)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tune_moe.py"), "--smoke", "--cpu-runs", "1",
                           "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tokens in (1, 16):  # one pass per config: the interpreter compiles nothing, so the check run is the timed one
        assert f"T={tokens}: 3 forward passes over 3 configs" in proc.stdout, proc.stdout[-3000:]
    (path,) = tmp_path.iterdir()
    table = json.loads(path.read_text())
    assert set(table) == {"1", "16"} and all(set(c) == set(tuning.CONFIG_KEYS) for c in table.values()), table
    for tokens, cfg in table.items():  # marks no default tile carries: the lookup must be reading this file
        cfg.update(num_warps=2, num_stages=5 if tokens == "1" else 6)
    path.write_text(json.dumps(table))
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    tuning.clear_cache()
    try:
        for tokens in (1, 16):  # smoke shape: E=8 held, I=96, H=64, k=2
            got = tuning.get_config(8, 96, 64, torch.float32, tokens, torch.device("cpu"), 2)
            want = tuning.finalize(table[str(tokens)], 96, 64, torch.float32, tuning.smem_limit("cpu"), None)
            assert got == want and got["num_warps"] == 2, (tokens, got, want)  # fitted to the shape, as every entry
    finally:
        tuning.clear_cache()


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


@pytest.mark.parametrize("bad", [{"BLOCK_M": 48}, {"BLOCK_K": 8}, {"GROUP_M": 0}, {"num_warps": 3},
                                 {"num_stages": 0}, {"BLOCK_N": 0}])
def test_tuned_table_refuses_tiles_a_gpu_cannot_compile(bad, monkeypatch, tmp_path, request):
    """A hand-edited table's tiles went to the kernels as they were: the interpreter runs BLOCK_K 8 (a GPU's
    tl.dot refuses K < 16) and GROUP_M 0 (garbage: _tile_ids divides by it); non-powers of two fail in Triton's
    compiler. Such a table is now refused at lookup, naming the file and the key."""
    request.addfinalizer(tuning.clear_cache)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    name = tuning.config_file_name(8, 24, 40, torch.float32, "cpu")
    (tmp_path / name).write_text(json.dumps({"7": dict(SMALL_TILES, **bad)}))
    tuning.clear_cache()
    key = next(iter(bad))
    with pytest.raises(ValueError, match=re.escape(name) + f".*{key}"):
        tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))
    (tmp_path / name).write_text(json.dumps({"7": SMALL_TILES}))  # the same table, well formed: used
    tuning.clear_cache()
    assert tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))["GROUP_M"] == SMALL_TILES["GROUP_M"]
