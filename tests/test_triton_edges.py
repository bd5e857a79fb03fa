"""Triton fused MoE and alignment at a deployment's edges, against the torch twin and the float64 loop.

Under TRITON_INTERPRET=1 in a child process (tests/triton_child.py), on CUDA too where there is one: top_k = E,
a one-expert shard, duplicate ids in a token's top-k, zero routing weights, ids outside [0, E), experts left
empty (one of them NaN or overflowing beside -1 slots), H / I off the tile sizes, non-contiguous inputs,
chunking, T = 0 / 1, empty alignment, the direct entry point's input checks, the other arguments' (chunk_tokens,
warmup's top_k, out_dtype), a token's NaN or fp16 overflow kept to its row, and bf16 (GPU only: the interpreter
computes it wrongly and is refused).
"""

from __future__ import annotations

import json
import sys

import torch

from tests.moe_cases import SMALL_TILES, TOL_FP16, TOL_FP32, make_inputs, rel_err
from tests.triton_child import child_tests

FP = {"float32": (torch.float32, TOL_FP32), "float16": (torch.float16, TOL_FP16)}


def _edited(tokens, experts, top_k, dtype="float32", edit=None, **kw):
    """make_inputs, then edit(x, w13, w2, ids, weights) -> the five tensors (None: unchanged)."""
    inputs = make_inputs(tokens, experts, top_k, dtype=FP[dtype][0], **kw)
    return edit(*inputs) if edit else inputs


def _dup_zero(x, w13, w2, ids, weights):
    ids[:, 1] = ids[:, 0]  # each token names one expert twice
    ids[2] = 3  # and one token names it three times
    weights[1] = 0.0  # a token routed with zero weights only
    weights[3, 0] = 0.0
    return x, w13, w2, ids, weights


def _one_expert_twice(x, w13, w2, ids, weights):
    ids = torch.zeros(weights.shape, dtype=torch.int64)  # [T, 2]: both slots on the shard's one expert
    ids[1, 1] = -1
    return x, w13, w2, ids, weights


def _out_of_range(x, w13, w2, ids, weights):
    ids[0, 0], ids[1, 1], ids[2, 0], ids[3] = 3, -7, 2**40, -1  # E, below -1, far past int32, a token routed away
    return x, w13, w2, ids, weights


def _ends_only(x, w13, w2, ids, weights):
    return x, w13, w2, torch.where(ids % 2 == 0, 0, 7), weights  # experts 1..6 receive no token


def _strided(x, w13, w2, ids, weights):
    """Views with unit last strides only: hidden, w13, w2 cut from wider rows, ids / weights every other column."""
    wide = lambda t: torch.cat([t, t], -1)[..., : t.shape[-1]]  # noqa: E731
    return wide(x), wide(w13), wide(w2), torch.cat([ids, ids], 1)[:, ::2], torch.cat([weights, weights], 1)[:, ::2]


def _every_other_expert(x, w13, w2, ids, weights):
    return x, torch.cat([w13, w13])[::2], torch.cat([w2, w2])[::2], ids, weights  # expert stride 2 * E's


def _row_offsets(x, w13, w2, ids, weights):
    """Storage offsets: tokens 5..10 of a batch, experts 1.. of a layer (ids shifted to match)."""
    return x[5:11], w13[1:], w2[1:], (ids[5:11] - 1).clamp(min=-1), weights[5:11]


def _bf16_weights(x, w13, w2, ids, weights):
    return x, w13, w2, ids, weights.bfloat16()  # router weights in another dtype than hidden's (bf16 is fine there)


def _beside_a_bad_expert(x, w13, w2, ids, weights):
    """No token routes to expert 0, whose products are NaN (fp32) or past fp16's range; some slots are -1."""
    ids[ids == 0] = -1
    w13[0] = float("nan") if x.dtype == torch.float32 else 1e4
    return x, w13, w2, ids, weights


def _half_weights(x, w13, w2, ids, weights):
    return x, w13.half(), w2.half(), ids, weights  # fp32 activations, fp16 experts: fp32 out


CASES = {  # name -> (inputs, fused_moe_triton options, tolerance)
    "T1-k4-of-E4": (lambda: _edited(1, 4, 4), {}, TOL_FP32),
    "T3-k4-of-E4-fp16": (lambda: _edited(3, 4, 4, "float16"), {}, TOL_FP16),
    "one-expert-shard": (lambda: _edited(6, 1, 1, routing="skip"), {}, TOL_FP32),
    "one-expert-k2-same-id": (lambda: _edited(5, 1, 2, edit=_one_expert_twice), {}, TOL_FP32),
    "duplicate-ids-zero-weights": (lambda: _edited(7, 4, 3, edit=_dup_zero), {}, TOL_FP32),
    "duplicate-ids-fp16": (lambda: _edited(7, 4, 3, "float16", edit=_dup_zero), {}, TOL_FP16),
    "ids-out-of-range": (lambda: _edited(6, 3, 2, edit=_out_of_range), {}, TOL_FP32),
    "experts-without-tokens": (lambda: _edited(9, 8, 2, edit=_ends_only), {}, TOL_FP32),
    "H136-I200": (lambda: _edited(3, 3, 2, hidden=136, inter=200, routing="skip"), {}, TOL_FP32),
    "H200-I136-fp16": (lambda: _edited(3, 3, 2, "float16", hidden=200, inter=136, routing="skip"), {}, TOL_FP16),
    "H40-I1408-default-tiles": (lambda: _edited(2, 2, 1, hidden=40, inter=1408), {"config": None}, TOL_FP32),
    "H2880-I24-default-tiles": (lambda: _edited(2, 2, 1, hidden=2880, inter=24), {"config": None}, TOL_FP32),
    "non-contiguous": (lambda: _edited(8, 4, 2, routing="skip", edit=_strided), {}, TOL_FP32),
    "row-offset-views": (lambda: _edited(20, 4, 2, routing="skip", edit=_row_offsets), {}, TOL_FP32),
    "topk-weights-bf16-hidden-fp16": (lambda: _edited(7, 4, 3, "float16", routing="skip", edit=_bf16_weights), {},
                                      TOL_FP16),
    "skips-beside-a-nan-expert": (lambda: _edited(6, 4, 2, routing="skip", edit=_beside_a_bad_expert), {},
                                  TOL_FP32),
    "skips-beside-an-overflowing-expert-fp16": (lambda: _edited(6, 4, 2, "float16", routing="skip",
                                                                edit=_beside_a_bad_expert), {}, TOL_FP16),
    "every-other-expert": (lambda: _edited(8, 4, 2, routing="skip", edit=_every_other_expert), {}, TOL_FP32),
    "fp32-hidden-fp16-experts": (lambda: _edited(8, 4, 2, routing="skip", edit=_half_weights), {}, TOL_FP16),
    "chunk-1-token": (lambda: _edited(5, 4, 2, routing="skip"), {"chunk_tokens": 1}, TOL_FP32),
    "chunk-3-of-8": (lambda: _edited(8, 4, 3, routing="skip"), {"chunk_tokens": 3}, TOL_FP32),
    "T4097-default-chunk": (lambda: _edited(4097, 2, 1, hidden=16, inter=16), {"config": None}, TOL_FP32),
}
CHECKS = ["align-no-pairs", "align-no-experts", "api-T0-T1", "direct-call-checks", "argument-checks", "bf16",
          "fp8-H200-I136-duplicates", "non-finite-token-fp32", "fp16-activation-overflow"]


def _run_case(name: str, device: str) -> dict:
    from elasticmoe.kernels import fused_moe_reference
    from elasticmoe.kernels.torch_moe import fused_moe_torch
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    build, options, tol = CASES[name]
    x, w13, w2, ids, weights = build()
    twin = fused_moe_torch(x, w13, w2, ids, weights)  # CPU
    ref = fused_moe_reference(x, w13.to(x.dtype), w2.to(x.dtype), ids, weights)
    options = {"config": SMALL_TILES, **options}
    out = fused_moe_triton(*(t.to(device) for t in (x, w13, w2, ids, weights)), **options).cpu()
    errs = {"vs_torch": rel_err(out, twin), "vs_ref": rel_err(out, ref)}
    return {**errs, "ok": max(errs.values()) <= tol and out.dtype == x.dtype and out.shape == x.shape}


def _child_align(device: str) -> dict:
    """No pairs (T = 0): the Triton twin left num_tokens_post_padded unwritten; no experts (E = 0): the torch
    twin returned it empty ([0], not [1])."""
    from elasticmoe.kernels.align import align_block_size_torch
    from elasticmoe.kernels.triton_align import align_block_size_triton

    results = {}
    for name, ids, experts in (("align-no-pairs", torch.zeros(0, 2, dtype=torch.int64), 4),
                               ("align-no-experts", torch.tensor([[0, -1], [1, 1]]), 0)):
        for block_m in (16, 64):
            a = align_block_size_torch(ids, experts, block_m)
            b = [t.cpu() for t in align_block_size_triton(ids.to(device), experts, block_m)]
            ok = all(map(torch.equal, a, b)) and a[2].tolist() == [0] and (a[1] == -1).all().item()
            results[name] = {"ok": results.get(name, {"ok": True})["ok"] and ok, "torch": [t.tolist() for t in a],
                             "triton": [t.tolist() for t in b]}
    return results


def _child_api(device: str) -> dict:
    """fused_moe on the triton backend at T = 0 (zeros) and T = 1, against the torch backend."""
    from elasticmoe.kernels import fused_moe

    x, w13, w2, ids, weights = make_inputs(1, 3, 3)
    one = fused_moe(*(t.to(device) for t in (x, w13, w2, ids, weights)), backend="triton").cpu()
    empty = fused_moe(*(t.to(device) for t in (x[:0], w13, w2, ids[:0], weights[:0])), backend="triton")
    err = rel_err(one, fused_moe(x, w13, w2, ids, weights, backend="torch"))
    return {"ok": err <= TOL_FP32 and empty.shape == (0, 40) and one.shape == (1, 40), "err": err}


def _child_direct_checks(device: str) -> dict:
    """fused_moe_triton called directly (tune_moe.py, benchmarks) checks its inputs before any launch: a w2 of the
    wrong width read past each expert's rows; fp8 weights without their scales ran as if they were floats."""
    from elasticmoe.kernels.fp8 import quantize_block_fp8
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    x, w13, w2, ids, weights = (t.to(device) for t in make_inputs(3, 2, 2))
    (q13, s13), (q2, s2) = quantize_block_fp8(w13.cpu()), quantize_block_fp8(w2.cpu())
    bad = {  # expected message fragment -> arguments
        "w2 (2, 40, 20) does not match": (x, w13, w2[:, :, :20], ids, weights),
        "w13 (2, 48, 36) does not match hidden": (x, w13[:, :, :36], w2, ids, weights),
        "topk_weights (3, 1) must have topk_ids' shape": (x, w13, w2, ids, weights[:, :1]),
        "topk_ids (2, 2) must be [T, k] with T = 3": (x, w13, w2, ids[:2], weights[:2]),
        "need both w13_scale and w2_scale": (x, q13.to(device), q2.to(device), ids, weights),
    }
    messages = {}
    for fragment, args in bad.items():
        try:
            fused_moe_triton(*args, config=SMALL_TILES)
            messages[fragment] = "no error"
        except ValueError as exc:
            messages[fragment] = str(exc)
    fp8 = dict(w13_scale=s13.to(device), w2_scale=s2.to(device))  # block_shape, split, act_quant: defaults
    try:
        got = fused_moe_triton(x, q13.to(device), q2.to(device), ids, weights, fp8=fp8).cpu()
        from elasticmoe.kernels.fp8 import fused_moe_fp8_reference

        fp8_err = rel_err(got, fused_moe_fp8_reference(x.cpu(), q13, q2, ids.cpu(), weights.cpu(), s13, s2))
    except (ValueError, KeyError) as exc:
        fp8_err = f"{type(exc).__name__}: {exc}"
    ok = all(fragment in msg for fragment, msg in messages.items())
    return {"ok": ok and isinstance(fp8_err, float) and fp8_err <= 1e-5, "messages": messages, "fp8_err": fp8_err}


def _child_arguments(device: str) -> dict:
    """Bad arguments besides the tensors, on the Triton path: chunk_tokens -1 failed in torch.empty ("negative
    dimension"), 0 ran as the default; warmup_moe's top_k 0 was a ZeroDivisionError; an int out_dtype truncated the
    result. Each is now a ValueError naming the argument."""
    from elasticmoe.kernels import fused_moe, warmup_moe
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    x, w13, w2, ids, weights = (t.to(device) for t in make_inputs(3, 2, 2))
    calls = {  # expected message -> the call
        **{f"chunk_tokens must be an int >= 1, got {bad!r}": (lambda bad=bad: fused_moe_triton(
            x, w13, w2, ids, weights, config=SMALL_TILES, chunk_tokens=bad)) for bad in (-1, 0, 2.5)},
        "top_k must be an int >= 1, got 0": lambda: warmup_moe(w13, w2, 0, "triton"),
        "out_dtype must be None (hidden's dtype), float32, float16, bfloat16 or float64, got torch.int32":
            lambda: fused_moe(x, w13, w2, ids, weights, backend="triton", out_dtype=torch.int32),
    }
    messages = {}
    for want, call in calls.items():
        try:
            call()
            messages[want] = "no error"
        except Exception as exc:  # noqa: BLE001 - the test records which error came
            messages[want] = f"{type(exc).__name__}: {exc}"
    return {"ok": all(got == f"ValueError: {want}" for want, got in messages.items()), "messages": messages}


def _child_bf16(device: str) -> dict:
    """bf16 on a GPU: the kernels' result; under the interpreter a clear refusal, and the torch path's result."""
    from elasticmoe.kernels import fused_moe, fused_moe_reference

    x, w13, w2, ids, weights = make_inputs(5, 4, 2, "skip", dtype=torch.bfloat16)
    ref = fused_moe_reference(x, w13, w2, ids, weights)
    if device == "cuda":
        out = fused_moe(*(t.to(device) for t in (x, w13, w2, ids, weights)), backend="triton").cpu()
        return {"ok": rel_err(out, ref) <= 2e-2, "err": rel_err(out, ref)}
    try:
        fused_moe(x, w13, w2, ids, weights, backend="triton")
        refused = ""
    except ValueError as exc:
        refused = str(exc)
    torch_err = rel_err(fused_moe(x, w13, w2, ids, weights, backend="torch"), ref)
    return {"ok": "bfloat16" in refused and "GPU only" in refused and torch_err <= 2e-2, "refused": refused,
            "torch_err": torch_err}


def _child_fp8_ragged(device: str) -> dict:
    """Block-FP8 experts, H = 200 and I = 136 (partial 128x128 scale blocks), duplicate ids, zero weights, an id
    past E: W8A16 and W8A8 against the float64 reference and the torch backend (which dequantizes)."""
    from elasticmoe.kernels import fused_moe
    from elasticmoe.kernels.fp8 import fused_moe_fp8_reference, quantize_block_fp8

    g = torch.Generator().manual_seed(5)
    w13, w2 = torch.randn(4, 272, 200, generator=g) / 14, torch.randn(4, 200, 136, generator=g) / 12
    (q13, s13), (q2, s2) = quantize_block_fp8(w13), quantize_block_fp8(w2)
    x, _, _, ids, weights = _dup_zero(*make_inputs(5, 4, 3, hidden=200, inter=136))
    ids[4, 2] = 9
    args = (x, q13, q2, ids, weights)
    twin = fused_moe(*args, backend="torch", w13_scale=s13, w2_scale=s2)
    errs = {}
    for act_quant in (False, True):
        out = fused_moe(*(t.to(device) for t in args), backend="triton", w13_scale=s13.to(device),
                        w2_scale=s2.to(device), act_quant=act_quant).cpu()
        ref = fused_moe_fp8_reference(*args, s13, s2, act_quant=act_quant)
        errs[f"act_quant={act_quant}"] = (rel_err(out, ref), rel_err(out, twin))
    ok = max(errs["act_quant=False"]) <= 1e-5 and errs["act_quant=True"][0] <= 1e-5
    return {"ok": ok, "errs": errs}  # W8A8 differs from the (W8A16) torch twin by the activations' rounding


def _child_nonfinite(device: str) -> dict:
    """One token's non-finite values stay in its row: a NaN in its hidden (fp32), and in fp16 an activation
    silu(gate) * up past 65504, which the kernels store in fp16 (inf there, then inf or NaN in the token's output;
    benchmarks/KERNELS.md) where the torch twin's C kernel keeps fp32 (finite, as the float64 loop)."""
    from elasticmoe.kernels import cpu_gemm, fused_moe_reference
    from elasticmoe.kernels.torch_moe import fused_moe_torch
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    results = {}
    for name, dtype, tol in (("non-finite-token-fp32", torch.float32, TOL_FP32),
                             ("fp16-activation-overflow", torch.float16, TOL_FP16)):
        x, w13, w2, ids, weights = make_inputs(6, 4, 2, dtype=dtype)
        if dtype == torch.float32:
            x[2, 3] = float("nan")
        else:
            x[2] *= 1000  # gate and up ~1000: their product overflows fp16; w2 / 1000 brings the output back
            w2 = w2 / 1000
        args = (x, w13, w2, ids, weights)
        out = fused_moe_triton(*(t.to(device) for t in args), config=SMALL_TILES).cpu()
        twin, ref = fused_moe_torch(*args), fused_moe_reference(*args)
        rest = torch.arange(6) != 2
        errs = {"vs_torch": rel_err(out[rest], twin[rest]), "vs_ref": rel_err(out[rest], ref[rest])}
        finite = {"triton": out[2].isfinite().all().item(), "ref": ref[2].isfinite().all().item()}
        token = {**finite, "torch_vs_ref": rel_err(twin[2], ref[2])}  # NaN where the twin's row is
        if dtype == torch.float32:
            row_ok = not finite["triton"] and not finite["ref"] and twin[2].isnan().all().item()
        else:  # the twin's fp32 activations: its C kernel (else fp16 products, as the kernels')
            row_ok = not finite["triton"] and finite["ref"] and (token["torch_vs_ref"] <= tol
                                                                  or not cpu_gemm.available())
        results[name] = {"ok": max(errs.values()) <= tol and row_ok, **errs, "token_2": token}
    return results


def _child_main(device: str) -> None:
    results = {name: _run_case(name, device) for name in CASES}
    results.update(_child_align(device))
    results["api-T0-T1"] = _child_api(device)
    results["direct-call-checks"] = _child_direct_checks(device)
    results["argument-checks"] = _child_arguments(device)
    results["bf16"] = _child_bf16(device)
    results["fp8-H200-I136-duplicates"] = _child_fp8_ragged(device)
    results.update(_child_nonfinite(device))
    print(json.dumps(results))


_edge_interpreted, _edge_cuda, test_triton_edges_interpreted, test_triton_edges_on_cuda = child_tests(
    __file__, "--edge-child", list(CASES) + CHECKS)


if __name__ == "__main__" and "--edge-child" in sys.argv:
    _child_main(sys.argv[sys.argv.index("--edge-child") + 1])
