"""check_moe_inputs' fast path: what it accepts the full checks accept, and it reads each attribute once."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.kernels.checks import _check_all, check_moe_inputs
from elasticmoe.kernels.fp8 import quantize_block_fp8
from tests.moe_cases import make_inputs

T, E, K, H, I = 5, 4, 2, 256, 128  # noqa: E741


def _float(**changes) -> dict:
    x, w13, w2, ids, weights = make_inputs(T, E, K, hidden=H, inter=I)
    args = dict(hidden=x, w13=w13, w2=w2, topk_ids=ids, topk_weights=weights)
    return {**args, **changes}


def _fp8(inter=I, **changes) -> dict:
    x, w13, w2, ids, weights = make_inputs(T, E, K, hidden=H, inter=inter)
    (q13, s13), (q2, s2) = quantize_block_fp8(w13), quantize_block_fp8(w2)
    args = dict(hidden=x, w13=q13, w2=q2, topk_ids=ids, topk_weights=weights, w13_scale=s13, w2_scale=s2)
    return {**args, **changes}


def _strided(shape) -> torch.Tensor:
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # last stride 2


META = torch.device("meta")
FLOAT_CASES = {
    "valid": _float(),
    "hidden 1-D": _float(hidden=torch.randn(H)),
    "hidden 3-D": _float(hidden=torch.randn(1, T, H)),
    "w13 2-D": _float(w13=torch.randn(2 * I, H)),
    "w2 4-D": _float(w2=torch.randn(1, E, H, I)),
    "topk_ids 1-D": _float(topk_ids=torch.zeros(T, dtype=torch.int64), topk_weights=torch.ones(T)),
    "topk_ids 3-D": _float(topk_ids=torch.zeros(T, K, 1, dtype=torch.int64), topk_weights=torch.ones(T, K, 1)),
    "w13 odd rows": _float(w13=torch.randn(E, 2 * I + 1, H)),
    "w13 other H": _float(w13=torch.randn(E, 2 * I, H + 1)),
    "w2 other E": _float(w2=torch.randn(E + 1, H, I)),
    "w2 other H": _float(w2=torch.randn(E, H - 1, I)),
    "w2 other I": _float(w2=torch.randn(E, H, I + 1)),
    "topk_ids other T": _float(topk_ids=torch.zeros(T + 1, K, dtype=torch.int64), topk_weights=torch.ones(T + 1, K)),
    "topk_weights other k": _float(topk_weights=torch.ones(T, K + 1)),
    "topk_ids float": _float(topk_ids=torch.zeros(T, K)),
    "topk_ids int16": _float(topk_ids=torch.zeros(T, K, dtype=torch.int16)),
    "topk_ids int32": _float(topk_ids=torch.zeros(T, K, dtype=torch.int32)),
    "hidden int": _float(hidden=torch.zeros(T, H, dtype=torch.int32)),
    "hidden float64": _float(hidden=torch.zeros(T, H, dtype=torch.float64)),
    "hidden bf16": _float(hidden=torch.zeros(T, H, dtype=torch.bfloat16)),
    "topk_weights int": _float(topk_weights=torch.ones(T, K, dtype=torch.int64)),
    "w13 fp16, w2 fp32": _float(w13=torch.randn(E, 2 * I, H, dtype=torch.float16)),
    "w13, w2 float64": _float(w13=torch.randn(E, 2 * I, H).double(), w2=torch.randn(E, H, I).double()),
    "w13 fp8 alone": _float(w13=torch.randn(E, 2 * I, H).to(torch.float8_e4m3fn)),
    "hidden on meta": _float(hidden=torch.randn(T, H, device=META)),
    "w2 on meta": _float(w2=torch.randn(E, H, I, device=META)),
    "topk_ids on meta": _float(topk_ids=torch.zeros(T, K, dtype=torch.int64, device=META)),
    "topk_weights on meta": _float(topk_weights=torch.ones(T, K, device=META)),
    "hidden strided": _float(hidden=_strided((T, H))),
    "w13 strided": _float(w13=_strided((E, 2 * I, H))),
    "w2 strided": _float(w2=_strided((E, H, I))),
    "hidden a row view": _float(hidden=torch.randn(2 * T, H)[::2]),  # not contiguous, unit last stride: valid
    "hidden columns of a wider one": _float(hidden=torch.randn(T, 2 * H)[:, :H]),
    "topk transposed": _float(topk_ids=torch.zeros(K, T, dtype=torch.int64).t(), topk_weights=torch.ones(K, T).t()),
    "T = 0": _float(hidden=torch.randn(0, H), topk_ids=torch.zeros(0, K, dtype=torch.int64),
                    topk_weights=torch.ones(0, K)),
    "T = 0 strided": _float(hidden=torch.randn(0, 2 * H)[:, ::2], topk_ids=torch.zeros(0, K, dtype=torch.int64),
                            topk_weights=torch.ones(0, K)),
    "E = 0": _float(w13=torch.randn(0, 2 * I, H), w2=torch.randn(0, H, I)),
    "k = 0": _float(topk_ids=torch.zeros(T, 0, dtype=torch.int64), topk_weights=torch.ones(T, 0)),
    "H = 1 strided": _float(hidden=torch.randn(T, 2)[:, :1], w13=torch.randn(E, 2 * I, 1),
                            w2=torch.randn(E, 1, I)),
    "float weights with a scale": _float(w13_scale=torch.ones(E, 2, 2)),
    "float weights with block_shape": _float(block_shape=(128, 128)),
    "float weights with split_scales": _float(split_scales=False),
}
FP8_CASES = {
    "fp8 valid": _fp8(),
    "fp8 split_scales False": _fp8(split_scales=False),
    "fp8 split_scales True": _fp8(split_scales=True),
    "fp8 block_shape list": _fp8(block_shape=[128, 128]),
    "fp8 block_shape other": _fp8(block_shape=(64, 128)),
    "fp8 block_shape of three": _fp8(block_shape=(128, 128, 1)),
    "fp8 block_shape 0": _fp8(block_shape=(0, 128)),
    "fp8 block_shape 1.5": _fp8(block_shape=(1.5, 128)),
    "fp8 no w2_scale": _fp8(w2_scale=None),
    "fp8 w13_scale bf16": _fp8(w13_scale=torch.ones(E, 2, 2, dtype=torch.bfloat16)),
    "fp8 w2_scale of another shape": _fp8(w2_scale=torch.ones(E, 2, 2)),
    "fp8 w13_scale on meta": _fp8(w13_scale=torch.ones(E, 2, 2, device=META)),
    "fp8 w2 float": _fp8(w2=torch.randn(E, H, I)),
    "fp8 hidden fp8": _fp8(hidden=torch.randn(T, H).to(torch.float8_e4m3fn)),
    "fp8 topk_ids float": _fp8(topk_ids=torch.zeros(T, K)),
    "fp8 hidden on meta": _fp8(hidden=torch.randn(T, H, device=META)),
    "fp8 w13 strided": _fp8(w13=torch.randn(E, 2 * I, 2 * H).to(torch.float8_e4m3fn)[..., ::2]),
    "fp8 layouts ambiguous": _fp8(inter=200),  # I % 128 = 72: 4 scale rows either way
    "fp8 layouts said": _fp8(inter=200, split_scales=False),
    "fp8 w2 other I": _fp8(w2=torch.randn(E, H, I + 1).to(torch.float8_e4m3fn)),
}


def _outcome(check, args: dict):
    try:
        return "ok", check(**args)
    except ValueError as exc:
        return "ValueError", str(exc)


@pytest.mark.parametrize("case", list(FLOAT_CASES) + list(FP8_CASES))
def test_fast_path_agrees_with_every_check(case):
    """Whatever check_moe_inputs accepts (its cheap path) the full checks accept, with the same fp8 description,
    and every refusal carries the full checks' message."""
    args = {**FLOAT_CASES, **FP8_CASES}[case]
    full = _outcome(lambda **a: _check_all(**{"w13_scale": None, "w2_scale": None, "block_shape": None,
                                              "split_scales": None, **a}), args)
    assert _outcome(check_moe_inputs, args) == full


def test_the_cases_are_both_accepted_and_refused():
    """The cases above reach both outcomes (a table of only valid or only bad inputs would check little)."""
    outcomes = [_outcome(check_moe_inputs, a)[0] for a in {**FLOAT_CASES, **FP8_CASES}.values()]
    assert outcomes.count("ok") >= 12 and outcomes.count("ValueError") >= 35, outcomes


class Reads(torch.Tensor):
    """A tensor that counts the reads of its attributes and methods (through __torch_function__)."""

    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        owner = getattr(func, "__self__", None)  # a property's __get__: the property
        cls.log.append((id(args[0]) if args else None, getattr(owner, "__name__", None) or func.__name__))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_valid_float_inputs_read_each_attribute_once():
    """The per-layer, per-step path (valid float weights) reads each tensor's shape, dtype, device and contiguity
    once: before, it read shapes again and again (dim, shape, tuple(shape), numel, stride; ~5 us a call)."""
    args = {name: t.as_subclass(Reads) for name, t in _float().items()}
    Reads.log.clear()
    assert check_moe_inputs(**args) is None
    names = {id(t): name for name, t in args.items()}
    reads = [(names[i], attr) for i, attr in Reads.log]
    repeated = sorted({r for r in reads if reads.count(r) > 1})
    assert reads and not repeated, repeated
    assert len(reads) <= 18, reads  # 5 shapes, 5 dtypes, 5 devices, 3 contiguity checks
