"""Tuned tile tables: malformed files refused naming the file, and the lookup for shapes a table has no entry for."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from elasticmoe.kernels import tuning
from tests.moe_cases import REPO, SMALL_TILES


@pytest.mark.parametrize("text,fragment", [
    ("{not json", "not a JSON tile table"),
    ("[1, 2]", "expected an object"),
    (json.dumps({"many": SMALL_TILES}), "key 'many' is not a token count"),
    (json.dumps({"8": [16, 32]}), "is not an object of"),
    (json.dumps({"8": dict(SMALL_TILES, BLOCK_M="16")}), "['BLOCK_M'] must be integers"),
    (json.dumps({"8": dict(SMALL_TILES, num_warps=4.5)}), "['num_warps'] must be integers"),
])
def test_malformed_tuned_table_named(text, fragment, tmp_path, monkeypatch, request):
    """A hand-edited table that is not JSON, or whose keys / entries are of the wrong kind, raised a bare
    JSONDecodeError / TypeError / int() error without the file's name (or ran 4.5 warps as 4). Now a ValueError
    naming the file."""
    request.addfinalizer(tuning.clear_cache)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    name = tuning.config_file_name(8, 24, 40, torch.float32, "cpu")
    (tmp_path / name).write_text(text)
    tuning.clear_cache()
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(fragment)):
        tuning.get_config(8, 24, 40, torch.float32, 3, torch.device("cpu"))


@pytest.mark.parametrize("inter,hidden", [(136, 200), (1408, 2880), (24, 40), (2880, 136)])
def test_lookup_without_an_entry_for_the_shape(inter, hidden, tmp_path, monkeypatch, request):
    """A table for another shape is not used; with none for this one, default tiles fitted to any I / H (powers of
    two >= 16, no wider than the problem); a table's nearest key beyond its largest or below its smallest; and
    E = 0 (no expert held) no longer divides by zero."""
    request.addfinalizer(tuning.clear_cache)
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(tmp_path))
    other = tuning.config_file_name(16, inter, hidden, torch.float32, "cpu")  # E = 16, asked for E = 8
    (tmp_path / other).write_text(json.dumps({"4": dict(SMALL_TILES, num_warps=2)}))
    tuning.clear_cache()
    cpu = torch.device("cpu")
    for tokens, experts, top_k in ((1, 8, 8), (4096, 8, 1), (3, 0, 2)):
        cfg = tuning.get_config(experts, inter, hidden, torch.float32, tokens, cpu, top_k)
        assert cfg["num_warps"] != 2 and set(cfg) == set(tuning.CONFIG_KEYS)
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0, cfg
        assert cfg["BLOCK_N"] <= max(16, 1 << (min(inter, hidden) - 1).bit_length()), cfg
    table = {"16": dict(SMALL_TILES, BLOCK_M=32), "64": dict(SMALL_TILES, BLOCK_M=64)}
    (tmp_path / tuning.config_file_name(8, inter, hidden, torch.float16, "cpu")).write_text(json.dumps(table))
    tuning.clear_cache()
    picks = [tuning.get_config(8, inter, hidden, torch.float16, t, cpu)["BLOCK_M"] for t in (1, 40, 41, 100000)]
    assert picks == [32, 32, 64, 64]  # nearest key; a tie (40) goes to the smaller


@pytest.mark.parametrize("group_k", [16, 48, 80])
def test_w8a8_scale_block_too_narrow_for_a_gpu_fp8_dot(group_k):
    """W8A8 (act_quant) keeps each K step inside one bk group, so bk = 16, 48 or 80 gave BLOCK_K 16: the interpreter
    ran it, but a GPU's fp8 tl.dot takes K >= 32 and Triton's compiler stopped at the first launch (see the compile
    test below). Now refused when the tiles are picked, naming act_quant and bk; W8A16 takes the same bk."""
    cpu, w8a8, w8a16 = torch.device("cpu"), (torch.bfloat16, group_k, True), (torch.bfloat16, group_k, False)
    with pytest.raises(ValueError, match=rf"act_quant \(W8A8\) needs the scale block bk a multiple of 32.*"
                                         rf"bk = {group_k}"):
        tuning.get_config(8, 1536, 7168, torch.float8_e4m3fn, 4, cpu, 8, w8a8)
    with pytest.raises(ValueError, match="multiple of 32"):
        tuning.candidate_configs(8, 1536, 7168, torch.float8_e4m3fn, cpu, w8a8)  # what a warm-up compiles
    assert group_k % tuning.get_config(8, 1536, 7168, torch.float8_e4m3fn, 4, cpu, 8, w8a16)["BLOCK_K"] == 0


def test_w8a8_scale_blocks_that_fit_still_pick_their_tiles():
    cpu = torch.device("cpu")
    for group_k, block_k in ((32, 32), (96, 32), (128, 128), (192, 64)):
        cfg = tuning.get_config(8, 1536, 7168, torch.float8_e4m3fn, 4, cpu, 8, (torch.bfloat16, group_k, True))
        assert cfg["BLOCK_K"] == block_k, (group_k, cfg)


def test_fp8_dot_with_k16_does_not_compile_for_sm90():
    """Why W8A8 needs BLOCK_K >= 32: Triton's real front end (no GPU needed, no interpreter) refuses the W8A8 GEMM at
    BLOCK_K 16, which TRITON_INTERPRET=1 runs."""
    code = (
        "from elasticmoe.kernels import aot_check\n"
        "cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)\n"
        "fn, args, consts, warps, stages = aot_check.gemm_jobs(cfg, 'bfloat16', 'w8a8', 48)[1]\n"
        "try:\n"
        "    aot_check.compile_kernel(fn, args, consts, 90, warps, stages)\n"
        "except Exception as e:\n"
        "    while e.__cause__ is not None:\n"
        "        e = e.__cause__\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    print('compiled')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "K >= 32" in proc.stdout, proc.stdout
