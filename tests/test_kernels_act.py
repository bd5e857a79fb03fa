"""fused_moe's expert activations (kernels.act.ExpertAct: tanh-GELU, GPT-OSS's SwiGLU, clamps) and biases.

The torch and Triton backends against the float64 reference (Triton under TRITON_INTERPRET=1 in a child process, and
on CUDA where there is one); the reference's activations against their formulas written out; an ExpertStore of
GPT-OSS, Gemma 4 and Step-3.7 checkpoints on the Triton backend against the same store on torch.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from elasticmoe.kernels import ExpertAct, fused_moe, fused_moe_reference
from elasticmoe.kernels.act import SILU
from tests.moe_cases import SMALL_TILES, TOL_FP16, TOL_FP32, _case_inputs, make_inputs, rel_err
from tests.triton_child import child_tests

ACTS = {  # name -> (activation, with biases); limits small enough to clip these inputs
    "gelu_tanh": (ExpertAct("gelu_tanh"), False),
    "silu-limit": (ExpertAct("silu", 0.3), False),
    "gelu_tanh-limit-bias": (ExpertAct("gelu_tanh", 0.3), True),
    "swiglu_oai-bias": (ExpertAct("swiglu_oai", 1.0, 1.702), True),
    "silu-bias": (SILU, True),
    "input_scaled": (ExpertAct(input_scaled=True), False),
}
CASES = {"T37-E8-k2": (37, 8, 2), "skips": "skips"}
STORE_FAMILIES = ("gpt_oss", "gemma4_text", "step3p7", "llama4_text")


def _biases(w13: torch.Tensor, seed: int = 1) -> dict:
    """b13 [E, 2I], b2 [E, H] in w13's dtype."""
    g = torch.Generator().manual_seed(seed)
    num_experts, two_i, hidden = w13.shape
    return {"b13": torch.randn(num_experts, two_i, generator=g).to(w13.dtype),
            "b2": torch.randn(num_experts, hidden, generator=g).to(w13.dtype)}


def _inputs(case, act_name: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    x, w13, w2, ids, weights = _case_inputs(case, dtype=dtype)
    return (x, w13, w2, ids, weights), (_biases(w13) if ACTS[act_name][1] else {})


def _ref(args, bias: dict, act: ExpertAct) -> torch.Tensor:
    return fused_moe_reference(*(t.cpu() for t in args), act, **{k: v.cpu() for k, v in bias.items()})


# ----------------------------------------------------------------------------- Triton (child process)

CHILD_NAMES = [f"{a}-{c}-{d}" for a in ACTS for c in CASES for d in ("fp32", "fp16")] + [
    f"store-{f}" for f in STORE_FAMILIES] + ["input_scaled-fp8-refused"]


def _child_main(device: str) -> None:
    """Every activation case on the Triton backend (interpreter on CPU; bf16 for fp16 on CUDA), then the stores."""
    import json

    from elasticmoe.kernels.triton_moe import fused_moe_triton

    results = {}
    for act_name, (act, _) in ACTS.items():
        for case_name, case in CASES.items():
            half = torch.float16 if device == "cpu" else torch.bfloat16
            for short, dtype in (("fp32", torch.float32), ("fp16", half)):
                args, bias = _inputs(case, act_name, dtype)
                ref = _ref(args, bias, act)
                on = tuple(t.to(device) for t in args)
                pair = (bias["b13"].to(device), bias["b2"].to(device)) if bias else None
                out = fused_moe_triton(*on, config=SMALL_TILES, act=act, bias=pair).cpu()
                tol = TOL_FP32 if dtype == torch.float32 else TOL_FP16 if dtype == torch.float16 else 2e-2
                err = rel_err(out, ref)
                results[f"{act_name}-{case_name}-{short}"] = {"ok": err <= tol and out.dtype == dtype, "err": err}
    results["input_scaled-fp8-refused"] = _fp8_input_scaled_refused(device)
    with tempfile.TemporaryDirectory() as folder:
        for family in STORE_FAMILIES:
            results[f"store-{family}"] = _store_case(family, Path(folder), device)
    print(json.dumps(results))


def _fp8_input_scaled_refused(device: str) -> dict:
    """Block-FP8 weights with input-scaled experts: refused by name before any launch."""
    from elasticmoe.kernels.triton_moe import fused_moe_triton

    x, w13, w2, ids, weights = (t.to(device) for t in make_inputs(3, 4, 2))
    fp8 = {"w13_scale": torch.ones(4, 1, 1, device=device), "w2_scale": torch.ones(4, 1, 1, device=device),
           "block_shape": (128, 128), "act_quant": False}
    try:
        fused_moe_triton(x, w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn), ids, weights, fp8=fp8,
                         act=ExpertAct(input_scaled=True))
    except ValueError as exc:
        return {"ok": "input-scaled experts (Llama 4) with block-FP8 weights" in str(exc), "error": str(exc)}
    return {"ok": False, "error": None}


def _store_case(family: str, folder: Path, device: str) -> dict:
    """A family's experts held twice (backend torch, backend triton): every MoE layer's forward agrees."""
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore
    from tests.test_families import make_family_checkpoint
    from tests.test_families_more import MORE_CASES

    files = open_model(str(make_family_checkpoint(family, folder / family, case=MORE_CASES.get(family))))
    moe, dev = files.spec.moe, torch.device(device)
    stores = [ExpertStore(files.ckpt, files.names, files.spec, torch.float32, dev, backend=backend)
              for backend in ("torch", "triton")]
    for store in stores:
        store.load((layer, e) for layer in moe.moe_layers for e in range(moe.num_experts))
    worst, acts = 0.0, set()
    for layer in moe.moe_layers:
        x, _, _, ids, weights = make_inputs(9, moe.num_experts, moe.top_k, hidden=files.spec.hidden_size, seed=layer)
        a, b = (s.forward(layer, x.to(dev), ids.to(dev), weights.to(dev)).cpu() for s in stores)
        worst = max(worst, rel_err(b, a))
        acts.add(stores[1].acts[layer])
    want = {"gpt_oss": "swiglu_oai", "gemma4_text": "gelu_tanh", "step3p7": "silu", "llama4_text": "silu"}[family]
    kinds_ok = {act.kind for act in acts} == {want} and (family != "step3p7" or any(act.limit for act in acts))
    kinds_ok = kinds_ok and all(act.input_scaled == (family == "llama4_text") for act in acts)
    return {"ok": worst <= TOL_FP32 and kinds_ok, "err": worst, "acts": sorted(map(repr, acts))}


child_interpreted, child_cuda, test_triton_act_interpreted, test_triton_act_on_cuda = child_tests(
    __file__, "--act-child", CHILD_NAMES)


# ----------------------------------------------------------------------------- torch backend, reference, checks

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_name", list(ACTS))
def test_torch_backend_matches_reference(act_name, dtype):
    act = ACTS[act_name][0]
    for case in CASES.values():
        args, bias = _inputs(case, act_name, dtype)
        out = fused_moe(*args, backend="torch", act=act, **bias)
        tol = {torch.float32: TOL_FP32, torch.float16: TOL_FP16, torch.bfloat16: 2e-2}[dtype]
        assert out.dtype == dtype and rel_err(out, _ref(args, bias, act)) <= tol
        wide = fused_moe(*args, backend="torch", act=act, out_dtype=torch.float64, **bias)
        assert wide.dtype == torch.float64 and rel_err(wide.to(dtype), out) <= tol


@pytest.mark.parametrize("act_name", list(ACTS))
def test_each_case_changes_the_result(act_name):
    """The activation, its clamp and the biases each matter on these inputs (a backend ignoring one would fail)."""
    act, with_bias = ACTS[act_name]
    args, bias = _inputs((37, 8, 2), act_name, torch.float32)
    ref = _ref(args, bias, act)
    assert rel_err(_ref(args, {}, SILU), ref) > 0.05
    if act.limit:
        assert rel_err(_ref(args, bias, ExpertAct(act.kind, 0.0, act.alpha)), ref) > 0.05
    if with_bias:
        assert rel_err(_ref(args, {}, act), ref) > 0.05
    if act.input_scaled:
        assert rel_err(_ref(args, bias, ExpertAct(act.kind, act.limit, act.alpha)), ref) > 0.05


def test_reference_activations_match_their_formulas():
    """GPT-OSS's expert (transformers' GptOssExperts, written out per token), tanh-GELU with a clamp, and Llama 4's
    input-scaled experts (each on weight * x, summed unweighted)."""
    (x, w13, w2, ids, weights), bias = _inputs((5, 4, 2), "swiglu_oai-bias", torch.float64)
    inter = w2.shape[2]
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate_up = x[t] @ w13[e].t() + bias["b13"][e]  # [2I]
            gate, up = gate_up[:inter].clamp(max=1.0), gate_up[inter:].clamp(-1.0, 1.0)
            glu = gate * torch.sigmoid(gate * 1.702)
            want[t] += weights[t, j] * (((up + 1) * glu) @ w2[e].t() + bias["b2"][e])
    got = fused_moe_reference(x, w13, w2, ids, weights, ACTS["swiglu_oai-bias"][0], **bias)
    assert torch.allclose(got, want, atol=1e-12)
    g = torch.linspace(-4, 4, 101, dtype=torch.float64)
    tanh_gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
    assert torch.allclose(ExpertAct("gelu_tanh", 0.5).apply(g, g), tanh_gelu.clamp(max=0.5) * g.clamp(-0.5, 0.5))
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = ((weights[t, j] * x[t]) @ w13[e].t()).chunk(2)  # [I] each
            want[t] += (torch.nn.functional.silu(gate) * up) @ w2[e].t()
    assert torch.allclose(fused_moe_reference(x, w13, w2, ids, weights, ExpertAct(input_scaled=True)), want,
                          atol=1e-12)


def test_nothing_routed_gives_zeros_with_biases():
    """Skipped slots and T = 0 add no bias."""
    args, bias = _inputs("all_skipped", "swiglu_oai-bias", torch.float32)
    for rows in (slice(None), slice(0, 0)):
        x, w13, w2, ids, weights = args
        out = fused_moe(x[rows], w13, w2, ids[rows], weights[rows], act=ACTS["swiglu_oai-bias"][0], **bias)
        assert out.shape == x[rows].shape and not out.any()


@pytest.mark.parametrize("kwargs, words", [
    (dict(act="gelu_tanh"), "act must be a kernels.act.ExpertAct"),
    (dict(b13=torch.zeros(8, 48)), "b13 and b2 come together"),
    (dict(b13=torch.zeros(8, 48), b2=torch.zeros(8, 41)), "b2 (8, 41) must be [8, 40]"),
    (dict(b13=torch.zeros(8, 24), b2=torch.zeros(8, 40)), "b13 (8, 24) must be [8, 48]"),
    (dict(b13=torch.zeros(8, 48, dtype=torch.int32), b2=torch.zeros(8, 40)), "b13 must be float32"),
    (dict(b13=torch.zeros(48, 8).t(), b2=torch.zeros(8, 40)), "b13 must have a unit last stride"),
])
def test_bad_activation_arguments_are_named(kwargs, words):
    args = make_inputs(3, 8, 2)
    for backend in ("torch", "auto"):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            fused_moe(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kind="relu"), "expert activation 'relu'"), (dict(limit=-1.0), "limit must be >= 0"),
    (dict(limit=float("nan")), "limit must be a finite number"), (dict(alpha=True), "alpha must be a finite"),
    (dict(input_scaled=1), "input_scaled must be a bool"),
])
def test_bad_expert_act_is_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ExpertAct(**kwargs)


if __name__ == "__main__" and "--act-child" in sys.argv:
    _child_main(sys.argv[sys.argv.index("--act-child") + 1])
