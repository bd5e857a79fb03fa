"""Compile every Triton MoE kernel ahead of time for a GPU target (sm_90 by default) without a GPU.

The Triton interpreter accepts code that a GPU will not compile; this runs the real compiler (TTIR ->
TTGIR -> PTX -> cubin with the bundled ptxas), with the argument specialisation the JIT launcher would
use for real model shapes (16-divisible pointers and model sizes, unit strides as constants; the per-call
sizes are `do_not_specialize`), for every default tile config and the three alignment kernels, and the
block-FP8 (W8A16, W8A8) variants, and the experts' other activations (GPT-OSS's biased SwiGLU, tanh-GELU, a clamped
SiLU, Llama 4's input-scaled experts). It also checks the shared-memory footprint (defaults must fit the
101,376 B of sm_86/89/120 on any target) and that the K loops were software-pipelined.

    python -m elasticmoe.kernels.aot_check [--arch 90] [--quick]

Must run without TRITON_INTERPRET (the interpreter replaces the kernels with Python functions).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_align, triton_gemm
from .act import SILU, ExpertAct
from .tuning import CONSUMER_SMEM, DEFAULT_TILES, FP32_CAPS, finalize

# GPT-OSS's biased clamped SwiGLU, Gemma 4's tanh-GELU, Step-3.7's clamped SiLU, Llama 4's input-scaled SiLU
ACT_VARIANTS = ((ExpertAct("swiglu_oai", 7.0), True), (ExpertAct("gelu_tanh"), False), (ExpertAct("silu", 7.0), False),
                (ExpertAct(input_scaled=True), False))
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}  # bytes per block (opt-in max)
DIV16 = "div16"  # marker: the launcher would see a 16-divisible value
TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compile_kernel(fn, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 3):
    """Compile `fn` for sm_<arch>. args: name -> "type" | ("type", DIV16) | 1 (specialised constant)."""
    signature, attrs, consts = {}, {}, dict(constexprs)
    for index, name in enumerate(fn.arg_names):
        value = constexprs.get(name, args.get(name))
        if name in constexprs or value == 1:
            signature[name], consts[name] = "constexpr", value
            continue
        kind, hint = (value, None) if isinstance(value, str) else value
        signature[name] = kind
        if hint == DIV16:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> dict:
    """{"REG": .., "STACK": .., "LOCAL": ..} from the bundled cuobjdump; {} if it is unavailable."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "-res-usage", file.name], capture_output=True, text=True).stdout
    return {key: int(val) for key, val in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def _ptr(kind: str):
    return (f"*{kind}", DIV16)


def gemm_jobs(config: dict, dtype: str, fp8: str | None = None, group_k: int = 128,
              act: ExpertAct | None = None, bias: bool = False) -> list[tuple]:
    """(kernel, args, constexprs, num_warps, num_stages) for both grouped GEMMs with one tile config.

    dtype: the activations'; fp8: None (weights in dtype), "w8a16" or "w8a8" (block-FP8 weights, 128 x group_k scales);
    act, bias: the experts' activation (act.py) and biases, as triton_moe._epilogue passes them.
    """
    t = TRITON_TYPES[dtype]
    tiles = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    tiles["DOT_PRECISION"] = "ieee" if dtype == "float32" else "tf32"
    common = dict(sorted_ids_ptr=_ptr("i32"), expert_ids_ptr=_ptr("i32"), num_post_padded_ptr=_ptr("i32"),
                  num_pairs="i32", hidden_size=("i32", DIV16), inter=("i32", DIV16), num_pid_m="i32",
                  stride_we=("i32", DIV16), stride_wn=("i32", DIV16), stride_wk=1)
    w = "fp8e4nv" if fp8 else t
    tiles.update(W_FP8=bool(fp8), A_FP8=fp8 == "w8a8", GROUP_N=128, GROUP_K=group_k)
    if fp8:  # scales [E, rows, cols] fp32: contiguous, so the last stride is 1
        common.update(w_scale_ptr=_ptr("fp32"), stride_se="i32", stride_sn="i32", stride_sk=1)
    else:  # what the launcher sees without scales: None and zeros
        tiles.update(w_scale_ptr=None)
        common.update(stride_se=("i32", DIV16), stride_sn=("i32", DIV16), stride_sk=("i32", DIV16))
    gate_up = dict(common, x_ptr=_ptr(t), w13_ptr=_ptr(w), act_ptr=_ptr(t), up_scale_base=("i32", DIV16),
                   topk_weights_ptr=_ptr("fp32"),
                   stride_xm=("i32", DIV16), stride_xk=1, stride_am=("i32", DIV16), stride_an=1)
    down = dict(common, act_ptr=_ptr(t), w2_ptr=_ptr(w), pair_out_ptr=_ptr("fp32"), topk_weights_ptr=_ptr("fp32"),
                stride_am=("i32", DIV16), stride_ak=1, stride_pm=("i32", DIV16))
    act = act or SILU
    consts13 = dict(tiles, TOP_K=8, ACT=act.code, LIMIT=float(act.limit), ALPHA=float(act.alpha), HAS_BIAS=False,
                    SCALE_INPUT=act.input_scaled)
    consts2 = dict(tiles, HAS_BIAS=False, SCALE_INPUT=act.input_scaled)
    for args, consts in ((gate_up, consts13), (down, consts2)):
        if bias:  # b13 [E, 2I] / b2 [E, H] in the weights' dtype, contiguous
            args.update(b_ptr=_ptr(t), stride_be=("i32", DIV16))
            consts.update(HAS_BIAS=True)
        else:  # what the launcher sees without biases: None and a zero
            args.update(stride_be=("i32", DIV16))
            consts.update(b_ptr=None)
    launch = (config["num_warps"], config["num_stages"])
    return [(triton_gemm.gate_up_kernel, gate_up, consts13, *launch),
            (triton_gemm.down_kernel, down, consts2, *launch)]


def fp8_jobs(quick: bool = False) -> list[tuple]:
    """Block-FP8 GEMMs with bf16 activations, the tiles fused_moe would pick (tuning.finalize): W8A16, W8A8;
    also W8A8 with a scale block bk = 96 (no power of two: BLOCK_K 32 and a whole-group amax load)."""
    limit, jobs = CONSUMER_SMEM, []
    for bound, config in DEFAULT_TILES[-1:] if quick else DEFAULT_TILES:
        for mode, group_k in (("w8a16", 128), ("w8a8", 128), ("w8a8", 96)):
            quant = (torch.bfloat16, group_k, mode == "w8a8")
            cfg = finalize(config, 1536, 7168, torch.float8_e4m3fn, limit, quant)
            jobs += gemm_jobs(cfg, "bfloat16", mode, group_k)
    return jobs


def small_jobs(dtype: str) -> list[tuple]:
    """Alignment kernels for small / DeepSeek-sized / large expert counts and the top-k sum, int32 and int64 ids, out in
    `dtype`, fp32 and fp64."""
    jobs = []
    for ids_type, e_p2, block_m in (("i64", 16, 16), ("i32", 1024, 128)):
        g = triton_align.align_shapes(1, e_p2 - 1, block_m)
        ids = dict(topk_ids_ptr=_ptr(ids_type), num_pairs="i32", num_experts="i32")
        jobs.append((triton_align.align_count_kernel, dict(ids, counts_ptr=_ptr("i32")),
                     dict(E_P2=e_p2, CHUNK=triton_align.CHUNK), 4, 1))
        jobs.append((triton_align.align_scan_kernel, dict(counts_ptr=_ptr("i32"), totals_ptr=_ptr("i32"),
                     num_chunks="i32"), dict(E_P2=e_p2, BLOCK_E=g["block_e"], ROWS=triton_align.SCAN_ROWS), 4, 1))
        place = dict(ids, offsets_ptr=_ptr("i32"), totals_ptr=_ptr("i32"), sorted_ids_ptr=_ptr("i32"),
                     expert_ids_ptr=_ptr("i32"), num_post_padded_ptr=_ptr("i32"), num_chunks="i32", num_blocks="i32")
        jobs.append((triton_align.align_place_kernel, place, dict(BLOCK_M=block_m, E_P2=e_p2,
                     CHUNK=triton_align.CHUNK, FILL_BLOCKS=g["fill_blocks"]), 4, 1))
    for ids_type, (block_t, block_h), out in (("i64", (2, 1024), TRITON_TYPES[dtype]), ("i32", (32, 64), "fp32"),
                                             ("i64", (2, 1024), "fp64")):  # fp64: an expert shard's partial sums
        args = dict(pair_out_ptr=_ptr("fp32"), topk_ids_ptr=_ptr(ids_type), out_ptr=_ptr(out),
                    num_tokens="i32", hidden_size=("i32", DIV16), num_experts="i32", stride_om=("i32", DIV16))
        consts = dict(TOP_K=8, BLOCK_T=block_t, BLOCK_H=block_h, ACC64=out == "fp64")
        jobs.append((triton_gemm.topk_sum_kernel, args, consts, 4, 1))
    return jobs


def distinct_jobs(jobs: list[tuple]) -> list[tuple]:
    """The jobs without repeats (same kernel, argument types and hints, constexprs, warps, stages), in order: two
    bound tiles that tuning.finalize maps to the same FP8 config would compile (and print) the same kernel twice."""
    seen, out = set(), []
    for fn, args, consts, warps, stages in jobs:
        key = (fn.__name__, tuple(sorted(args.items())), tuple(sorted(consts.items())), warps, stages)
        if key not in seen:
            seen.add(key)
            out.append((fn, args, consts, warps, stages))
    return out


def run(arch: int = 90, quick: bool = False) -> list[str]:
    """Compile everything; return one report line per kernel. Raises on compile, smem or spill failure."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the AOT check needs the real compiler")
    configs = [cfg for _, cfg in DEFAULT_TILES]
    fp32 = {key: min(val, FP32_CAPS.get(key, val)) for key, val in configs[-1].items()}
    jobs = []
    for config in configs[:1] if quick else configs:
        jobs += gemm_jobs(config, "bfloat16")
    jobs += gemm_jobs(configs[-1], "float16") + gemm_jobs(fp32, "float32") + small_jobs("bfloat16")
    jobs += fp8_jobs(quick)
    for act, bias in ACT_VARIANTS:  # the experts' other activations (Gemma 4, Step-3.7, GPT-OSS) with bf16 weights
        jobs += gemm_jobs(configs[-1], "bfloat16", act=act, bias=bias)
    limit, lines = min(SMEM_LIMIT.get(arch, CONSUMER_SMEM), CONSUMER_SMEM), []
    for fn, args, consts, warps, stages in distinct_jobs(jobs):
        kernel = compile_kernel(fn, args, consts, arch, warps, stages)
        shared = kernel.metadata.shared
        pipelined = kernel.asm["ttgir"].count("async_copy_global_to_local")
        usage = resource_usage(kernel.asm["cubin"])
        consts = {key: val for key, val in consts.items() if not key.endswith("_ptr")}
        types = ",".join(sorted({arg[0] for arg in args.values() if isinstance(arg, tuple) and arg[0][0] == "*"}))
        line = (f"{fn.__name__:<18} {types} {consts} warps={warps} stages={stages}: smem {shared} B, "
                f"{pipelined} async copies, regs {usage.get('REG', '?')}")
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            raise RuntimeError(f"{line}: register spills {usage}")
        if shared > limit:
            raise RuntimeError(f"{line}: exceeds the {limit} B shared-memory limit (sm_{arch}, consumer GPUs)")
        if fn.__name__ in ("gate_up_kernel", "down_kernel") and stages > 1 and pipelined == 0:
            raise RuntimeError(f"{line}: K loop was not pipelined")
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--quick", action="store_true", help="one bf16 tile config instead of all defaults")
    args = parser.parse_args()
    for line in run(args.arch, args.quick):
        print(line)
    print(f"OK: all Triton MoE kernels compile for sm_{args.arch}", file=sys.stderr)


if __name__ == "__main__":
    main()
