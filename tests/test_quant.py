"""Quantized checkpoints: block-FP8 (weight_scale_inv) dequantized on load, MXFP4 experts, other formats refused.

transformers 5.23 cannot load an FP8 checkpoint on CPU here (its FP8 quantizer needs `accelerate`, which the
project does not install), so the reference is transformers' own FP8 dequantizer applied to the same tensors,
and the model transformers builds from those dequantized weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from elasticmoe.model.tiny import make_tiny_model
from tests.test_families import _assert_matches, _copy

BLOCK = (128, 128)  # DeepSeek-V3 / Qwen3-FP8 as published
FP8_MAX = 448.0  # largest finite float8_e4m3fn
NOT_CONVERTED = ("embed_tokens", "lm_head", "mlp.gate.weight")  # bf16 in the published checkpoints (and norms)


def _fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/128), ceil(K/128)]), one scale per
    128 x 128 block (edge blocks partial) mapping the block's max |w| to 448, as DeepSeek's checkpoints store it."""
    n, k = w.shape
    pad = torch.zeros(math.ceil(n / BLOCK[0]) * BLOCK[0], math.ceil(k / BLOCK[1]) * BLOCK[1])
    pad[:n, :k] = w
    blocks = pad.unflatten(0, (-1, BLOCK[0])).unflatten(-1, (-1, BLOCK[1]))  # [n/128, 128, k/128, 128]
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX  # [n/128, k/128]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).flatten(2).flatten(0, 1)[:n, :k]
    return q.to(torch.float8_e4m3fn), scale.float()


def _quantize(plain: Path, out: Path, quant_config: dict) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """An FP8 copy of `plain` in the published layout (every linear weight but the embeddings, LM head and
    routers), a copy holding transformers' dequantization of it, and the dequantized tensors by name."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    quant_dir, ref_dir = _copy(plain, out / "fp8"), _copy(plain, out / "dequantized")
    quant, deq = {}, {}
    for name, t in load_file(str(plain / "model.safetensors")).items():
        packed = t.dim() == 3 and name.endswith(("experts.gate_up_proj", "experts.down_proj"))  # [E, N, K]
        if packed or t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in NOT_CONVERTED):
            q, s = _fp8_block(t) if not packed else (torch.stack(x) for x in zip(*map(_fp8_block, t)))
            quant[name], quant[name + "_scale_inv"] = q, s
            deq[name] = _dequantize_fp8_weight(q, s, list(BLOCK), torch.float32)
        else:
            quant[name] = deq[name] = t
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quant_dir / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    return quant_dir, ref_dir, deq


FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.fixture(scope="module")
def fp8_224(tmp_path_factory):
    """layout -> the FP8 copy of a qwen3_moe at hidden 256, intermediate 224 (1.75 blocks), made once a layout for
    the tests that only open it (one make and quantization, not one a test)."""
    made = {}

    def get(layout: str = "per-expert") -> Path:
        if layout not in made:
            out = tmp_path_factory.mktemp(f"fp8-{layout}")
            plain = make_tiny_model("qwen3_moe", out / "plain", hidden=256, intermediate=224, layout=layout)
            made[layout] = _quantize(plain, out, FP8_CONFIG)[0]
        return made[layout]
    return get


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_block_fp8_matches_transformers_dequantized(family, tmp_path):
    """Experts, attention, shared experts and dense MLPs stored as FP8 with 128x128 scales (partial edge blocks:
    MLA's 96-row kv_a_proj) load as transformers dequantizes them, bit for bit, and the model's logits and greedy
    tokens are transformers' on the dequantized weights."""
    from elasticmoe import LLM
    from elasticmoe.model import open_model

    plain = make_tiny_model(family, tmp_path / "plain", hidden=256, intermediate=128, layers=2, experts=8)
    quant_dir, ref_dir, deq = _quantize(plain, tmp_path, {**FP8_CONFIG, "modules_to_not_convert": ["lm_head"]})
    files = open_model(str(quant_dir))
    assert not any(n.endswith("_scale_inv") for n in files.ckpt.names())
    fp8 = [n for n in files.ckpt.names() if files.ckpt._meta[n]["dtype"] == "F8_E4M3"]
    kinds = {".experts.", "self_attn."} | ({"shared_experts.", "layers.0.mlp."} if family == "deepseek_v3" else set())
    assert all(any(k in n for n in fp8) for k in kinds)  # DeepSeek's layer 0 is a dense MLP
    for name in fp8:
        assert torch.equal(files.ckpt.read(name), deq[name]), name
    llm = LLM(str(quant_dir), dtype="float32")
    _assert_matches(llm, ref_dir, family)


def test_fp8_packed_experts_row_by_row(tmp_path):
    """Packed FP8 experts [E, 2I, H] with scales [E, 2I/128, H/128]: one expert's row reads only its own
    weights and scales, dequantized like the whole tensor's row."""
    from elasticmoe.model.checkpoint import Checkpoint

    w = torch.randn(4, 256, 384)
    q, s = zip(*(_fp8_block(e) for e in w))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    save_file({"experts.gate_up_proj": torch.stack(q), "experts.gate_up_proj_scale_inv": torch.stack(s)},
              str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    whole = ckpt.read("experts.gate_up_proj")
    before = ckpt.bytes_read
    assert torch.equal(ckpt.read("experts.gate_up_proj", index=2), whole[2])
    assert ckpt.bytes_read - before == 256 * 384 + 2 * 3 * 4  # one expert's FP8 bytes and its 2 x 3 scales
    assert (whole - w).abs().max() <= w.abs().max() / 8  # e4m3: 3 mantissa bits


def test_fp8_ue8m0_scales(tmp_path):
    """Scales stored as E8M0 exponent bytes (uint8, scale_fmt "ue8m0") dequantize as transformers' FP8
    dequantizer reads them, and read alone they come back as float32 powers of two."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from elasticmoe.model.checkpoint import Checkpoint

    q = _fp8_block(torch.randn(256, 384))[0]
    s = torch.randint(118, 136, (2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {**FP8_CONFIG, "scale_fmt": "ue8m0"}}))
    save_file({"a.weight": q, "a.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.read("a.weight"), Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32))
    out = torch.empty(2, 3)
    ckpt.read_into("a.weight_scale_inv", out)
    assert torch.equal(out, torch.exp2(s.float() - 127))


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantization_refused_by_name(method, tmp_path):
    from elasticmoe.model import open_model
    from elasticmoe.model.quant import QuantError

    plain = make_tiny_model("qwen3_moe", tmp_path / "m")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=rf"config\.json: quantization_config\.quant_method='{method}'"):
        open_model(str(plain))


def test_fp8_without_scales_or_config_refused(tmp_path):
    """An F8_E4M3 tensor is never cast bare: without quantization_config, or without its weight_scale_inv,
    or with a scale grid that does not fit the weight (or a weight of one dim, which has no block grid), the load
    fails naming the tensor."""
    from elasticmoe.model.checkpoint import Checkpoint
    from elasticmoe.model.quant import QuantError

    q, s = _fp8_block(torch.randn(256, 256))
    (tmp_path / "config.json").write_text("{}")
    save_file({"a.weight": q, "a.weight_scale_inv": s}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QuantError, match=r"'a\.weight' is F8_E4M3 but config\.json has no quantization_config"):
        Checkpoint(tmp_path).read("a.weight")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": FP8_CONFIG}))
    save_file({"a.weight": q}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QuantError, match=r"'a\.weight' has no 'a\.weight_scale_inv'"):
        Checkpoint(tmp_path)
    save_file({"a.weight": q, "a.weight_scale_inv": s[:1]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QuantError, match=r"'a\.weight_scale_inv' is \[1, 2\], want \[2, 2\]"):
        Checkpoint(tmp_path)
    save_file({"a.weight": q[0], "a.weight_scale_inv": s[0]}, str(tmp_path / "model.safetensors"))  # was IndexError
    with pytest.raises(QuantError, match=r"model\.safetensors: FP8 tensor 'a\.weight' is \[256\], but block-scaled"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("layout, name, dtype", [
    ("per-expert", "model.layers.1.mlp.experts.3.up_proj.weight", torch.float8_e4m3fn),
    ("packed", "model.layers.0.mlp.experts.gate_up_proj", torch.float8_e5m2),
])
def test_fp8_experts_without_an_fp8_config_fail_the_open(layout, name, dtype, tmp_path):
    """An expert weight stored FP8 (no scale beside it) under a config.json with no quantization_config: the open
    passed and only each load of the expert failed; now the open fails (headers only), naming file, tensor, dtype."""
    from elasticmoe.model import open_model
    from elasticmoe.model.quant import QuantError

    path = make_tiny_model("qwen3_moe", tmp_path / layout, layers=2, layout=layout)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    stored = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[dtype]
    with pytest.raises(QuantError, match=re.escape(f"{path / 'model.safetensors'}: {name!r} is {stored} but "
                                                   "config.json has no quantization_config 'fp8' to scale it")):
        open_model(path)


def test_an_fp8_checkpoint_whose_config_lost_its_quantization_config_fails_naming_an_expert(tmp_path):
    """A block-FP8 checkpoint whose config.json has no quantization_config: its experts' F8_E4M3 weights are named
    (they would be read unscaled), not only the weight_scale_inv tensors nothing uses."""
    from elasticmoe.model import open_model
    from elasticmoe.model.quant import QuantError

    quant_dir = _quantize(make_tiny_model("qwen3_moe", tmp_path / "plain", layers=2), tmp_path, FP8_CONFIG)[0]
    cfg = json.loads((quant_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"
    with pytest.raises(QuantError, match=re.escape(f"{quant_dir / 'model.safetensors'}: {name!r} is F8_E4M3 but "
                                                   "config.json has no quantization_config 'fp8'")):
        open_model(quant_dir)


def test_mxfp4_dequant_is_transformers(tmp_path):
    """MXFP4 blocks [E, N, K/32, 16] and E8M0 scales [E, N, K/32] as GPT-OSS ships them: our dequantization is
    transformers' (convert_moe_packed_tensors, which returns the transposed [E, K, N]), on every code and a
    spread of exponents."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from elasticmoe.model.quant import dequant_mxfp4

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 64, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(120, 134, (3, 64, 4), dtype=torch.uint8, generator=gen)
    ours = dequant_mxfp4(blocks, scales)  # [E, N, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    assert torch.equal(ours, theirs.transpose(1, 2))


def _e2m1(code: int) -> float:
    """One FP4 (E2M1) code by the OCP MX spec: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
    subnormal (m * 0.5)."""
    sign, exp, man = code >> 3, (code >> 1) & 3, code & 1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man * 0.5)
    return -mag if sign else mag


def _e8m0(byte: int) -> float:
    """One E8M0 scale by the OCP MX spec: 2**(byte - 127), and 0xFF is NaN."""
    return math.nan if byte == 0xFF else 2.0 ** (byte - 127)


def test_mxfp4_dequant_follows_the_spec_for_every_scale_byte():
    """Every E8M0 byte (0..255) times every code pair, against a per-element recomputation from the spec: a scale
    of 0xFF is NaN for its whole block (it gave inf or 0), the smallest scales stay exact (subnormal) floats."""
    from elasticmoe.model.quant import dequant_mxfp4, fp8_scale_float

    codes = torch.arange(256, dtype=torch.uint8)
    blocks = codes.reshape(16, 16).repeat(256, 1, 1)  # [256 scales, G=16, 16 bytes]: every byte each
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 16).contiguous()  # [256, G]
    ours = dequant_mxfp4(blocks, scales)  # [256, 512]
    want = torch.tensor([[_e2m1(b & 15) * _e8m0(s) if i == 0 else _e2m1(b >> 4) * _e8m0(s)
                          for b in range(256) for i in (0, 1)] for s in range(256)], dtype=torch.float64)
    assert torch.equal(ours.isnan(), want.isnan()) and ours[255].isnan().all()
    assert torch.equal(ours[:255], want[:255].to(torch.float32))
    ue8m0 = fp8_scale_float(torch.arange(256, dtype=torch.uint8))  # the FP8 checkpoints' "ue8m0" scales, same bytes
    assert ue8m0[255].isnan() and torch.equal(ue8m0[:255], torch.tensor([_e8m0(s) for s in range(255)]).float())


@pytest.mark.parametrize("layout", ["per-expert", "packed"])
def test_fp8_experts_kept_quantized(layout, fp8_224):
    """Experts kept in FP8 (what the Triton backend runs on CUDA; here fused_moe's torch backend dequantizes per
    call) hold a quarter of the float32 bytes plus scales, and give the dequantized experts' outputs exactly,
    after a drop and a reload too. intermediate 224 = 1.75 blocks: gate and up scales apart ("split", per-expert
    files) or as one [2I, H] tensor's ("joint", packed) have the same 4 rows, so the store must say which."""
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore

    files = open_model(str(fp8_224(layout)))
    cpu = torch.device("cpu")
    kept = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, cpu, backend="torch", keep_fp8=True)
    deq = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, cpu, backend="torch")
    assert not deq.keep_fp8  # CPU: dequantized on load by default
    pairs = [(l, e) for l in (0, 1) for e in range(8)]
    kept.load(pairs)
    deq.load(pairs)
    le = kept.snapshot(1)
    assert le.w13.dtype == torch.float8_e4m3fn and tuple(le.w13_scale.shape) == (8, 4, 2)  # same rows either way
    scales = le.w13_scale[0].numel() + le.w2_scale[0].numel()
    assert kept.weight_bytes() == deq.weight_bytes() // 4 + 2 * 8 * scales * 4
    kept.drop([(1, 3)])
    kept.load([(1, 3)])  # now held last
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=gen)  # [T, H]
    ids = torch.randint(0, 8, (16, 2), generator=gen)  # [T, k]
    w = torch.rand(16, 2, generator=gen)
    for layer in (0, 1):
        assert torch.equal(kept.forward(layer, x, ids, w), deq.forward(layer, x, ids, w))


KEPT_TRITON = r"""
import sys, torch
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
files = open_model(sys.argv[1])
cpu = torch.device("cpu")
kept = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, cpu, backend="triton")
deq = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, cpu, backend="torch", keep_fp8=False)
pairs = [(1, e) for e in (0, 2, 3, 5, 6)]
kept.load(pairs)
deq.load(pairs)
assert kept.keep_fp8 and kept.snapshot(1).w13.dtype == torch.float8_e4m3fn
assert tuple(kept.snapshot(1).w13_scale.shape) == (5, 4, 1)  # split: 2 x ceil(192 / 128) rows
gen = torch.Generator().manual_seed(0)
x = torch.randn(5, 128, generator=gen)  # [T, H]
ids = torch.tensor([[0, 2], [3, 5], [6, 0], [2, -1], [5, 3]])  # [T, k] global ids, all held
w = torch.rand(5, 2, generator=gen)
a, b = kept.forward(1, x, ids, w), deq.forward(1, x, ids, w)
print(((a - b).abs().max() / b.abs().max()).item())
"""


def test_fp8_experts_kept_run_by_triton_interpreter(tmp_path):
    """Where the Triton backend runs (here its interpreter, in a child process), FP8 experts are kept quantized
    by default and its block-FP8 kernel (W8A16) gives the dequantized experts' outputs to float32 rounding.
    Gate and up scales apart (intermediate 192 = 1.5 blocks: "split" rows). About 15 s of CPU, nearly all the
    interpreter running warmup_moe's tile configurations."""
    import os
    import subprocess
    import sys

    plain = make_tiny_model("qwen3_moe", tmp_path / "plain", hidden=128, intermediate=192)
    quant_dir = _quantize(plain, tmp_path, FP8_CONFIG)[0]
    out = subprocess.run([sys.executable, "-c", KEPT_TRITON, str(quant_dir)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("capability,kept", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_experts_kept_only_where_triton_runs_fp8(capability, kept, fp8_224, monkeypatch):
    """Triton has no float8_e4m3fn before sm_89 (A100, A10, RTX 30xx: "type fp8e4nv not supported in this
    architecture", aot_check --arch 80): there a CUDA store dequantizes FP8 experts on load, and fused_moe's auto
    backend runs FP8 weights with torch, rather than every call failing to compile."""
    from elasticmoe.kernels import resolve_backend
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    files = open_model(str(fp8_224()))
    cuda = torch.device("cuda", 0)  # nothing is allocated: the choice is made from the device alone
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.bfloat16, cuda)
    assert store.keep_fp8 is kept and store.backend == "auto"
    assert resolve_backend("auto", cuda, fp8=True) == ("triton" if kept else "torch")
    assert resolve_backend("auto", cuda) == "triton"  # float weights: Triton on any CUDA GPU


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0)])
def test_triton_asked_for_fp8_before_sm89_refused_clearly(capability, fp8_224, monkeypatch):
    """backend="triton" (argument, or ELASTICMOE_MOE_BACKEND=triton) with float8_e4m3fn weights on a GPU before
    sm_89 was returned as is, and every fused_moe / warmup_moe call then failed inside Triton's compiler ("type
    fp8e4nv not supported in this architecture"); it is now a ValueError naming the backend and the capability.
    A store asked for triton there still dequantizes FP8 experts on load and runs them with Triton."""
    from elasticmoe.kernels import BACKEND_ENV, resolve_backend
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    runs = capability >= (8, 9)
    for how, call in (("backend='triton'", lambda: resolve_backend("triton", cuda, fp8=True)),
                      (f"{BACKEND_ENV}=triton", lambda: (monkeypatch.setenv(BACKEND_ENV, "triton"),
                                                         resolve_backend("auto", cuda, fp8=True))[1])):
        if runs:
            assert call() == "triton"
        else:
            with pytest.raises(ValueError, match=rf"{re.escape(how)}.*capability {capability[0]}\.{capability[1]}"
                                                 r".*'torch'"):
                call()
        assert resolve_backend("triton", cuda) == "triton"  # float weights: Triton on any CUDA GPU
        assert resolve_backend("torch", cuda, fp8=True) == "torch"
    files = open_model(str(fp8_224()))
    for backend in ("triton", "auto"):  # env var still forcing triton for "auto"
        store = ExpertStore(files.ckpt, files.names, files.spec, torch.bfloat16, cuda, backend=backend)
        assert store.keep_fp8 is runs


BLOCK_SIZE = r"quantization_config\.weight_block_size="


@pytest.mark.parametrize("quant_config, words", [
    ("fp8", r"quantization_config='fp8' is not an object"),
    ({**FP8_CONFIG, "weight_block_size": 128}, BLOCK_SIZE + r"128: want \[rows, cols\]"),
    ({**FP8_CONFIG, "weight_block_size": [128, "a"]}, BLOCK_SIZE + r"\[128, 'a'\]: want \[rows, cols\]"),
    ({**FP8_CONFIG, "weight_block_size": [128.5, 128]}, BLOCK_SIZE + r"\[128\.5, 128\]: want"),  # was read as 128
    ({**FP8_CONFIG, "weight_block_size": [True, 128]}, BLOCK_SIZE + r"\[True, 128\]: want"),  # was read as 1
])
def test_a_malformed_quantization_config_is_refused_naming_the_field(quant_config, words, tmp_path):
    """A quantization_config that is no object, or a weight_block_size that is not two whole numbers: QuantError
    naming config.json and the field (was AttributeError / TypeError, or a block size silently truncated)."""
    from elasticmoe.model import open_model
    from elasticmoe.model.quant import QuantError

    plain = make_tiny_model("qwen3_moe", tmp_path / "m")
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantError, match=r"config\.json: " + words):
        open_model(str(plain))
