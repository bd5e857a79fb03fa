"""GPT-OSS beyond tests/test_families.py: MXFP4 experts on disk, and its biased experts on gRPC expert shards."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.test_families import _assert_matches, _copy, _rel, make_family_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    return {"gpt_oss": make_family_checkpoint("gpt_oss", tmp_path_factory.mktemp("gpt_oss") / "plain")}


_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, out, in] -> MXFP4 as gpt-oss ships it: blocks [E, out, in/32, 16] uint8 (two E2M1 codes a byte, low
    nibble first) and E8M0 scales [E, out, in/32] uint8 (2**(s - 127) per group of 32), rounded to nearest."""
    groups = w.reshape(*w.shape[:-1], -1, 32)  # [E, out, G, 32]
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0))  # [E, out, G]: max |w| -> <= 6
    codes = ((groups / torch.exp2(exp)[..., None])[..., None] - _FP4).abs().argmin(-1)  # [E, out, G, 32]
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def _mxfp4_checkpoints(plain, tmp_path) -> tuple:
    """(quant_dir, ref_dir, config): copies of `plain` with MXFP4 experts, and with transformers' dequantization of
    them, and the MXFP4 copy's config.json."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    quant_dir, ref_dir = _copy(plain, tmp_path / "mxfp4"), _copy(plain, tmp_path / "dequantised")
    quant, deq = {}, {}
    for name, t in load_file(str(plain / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stored [E, in, out]
            blocks, scales = _mxfp4(t.transpose(1, 2).contiguous())
            quant[f"{name}_blocks"], quant[f"{name}_scales"] = blocks, scales
            deq[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
            assert deq[name].shape == t.shape and 0 < _rel(deq[name], t) < 0.2  # quantised, and close
        else:
            quant[name] = deq[name] = t
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((quant_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    return quant_dir, ref_dir, cfg


def test_gpt_oss_mxfp4_matches_transformers(family_dirs, tmp_path):
    """MXFP4 experts on disk (gate_up_proj_blocks / _scales, as gpt-oss ships them), dequantised on load, give
    transformers' logits and greedy tokens on the weights transformers' own MXFP4 dequantiser makes of them."""
    from elasticmoe import LLM
    from elasticmoe.model import ModelSpecError

    quant_dir, ref_dir, cfg = _mxfp4_checkpoints(family_dirs["gpt_oss"], tmp_path)
    llm = LLM(str(quant_dir), dtype="float32")
    assert all(r.gate_up_scales and r.down_scales for r in llm.files.names.experts.values())
    _assert_matches(llm, ref_dir, "gpt_oss")
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match=r"quant_method='fp8'"):
        LLM(str(quant_dir), dtype="float32")


@pytest.mark.parametrize("part, dtype, words", [
    ("gate_up_proj_blocks", "I8", "MXFP4 {name!r} is I8, want U8"),
    ("down_proj_scales", "I8", "MXFP4 {name!r} is I8, want U8"),
    ("gate_up_proj_bias", "I32", "{name!r} is stored as I32, but it is a weight (floating point)"),
])
def test_mxfp4_bytes_a_header_calls_signed_fail_the_open_naming_them(family_dirs, tmp_path, part, dtype, words):
    """MXFP4 blocks and E8M0 scales are bytes (U8); a header saying I8 made codes of 128 and up negative, read
    through the FP4 table's other end and 2**(s - 127) with negative s: garbage weights, silently. That, and a bias
    of integers, failed each load of the experts; now the open (headers only)."""
    from elasticmoe.model import CheckpointError, open_model
    from tests.test_checkpoint_lies import _rewrite

    quant_dir = _mxfp4_checkpoints(family_dirs["gpt_oss"], tmp_path)[0]
    name = f"model.layers.1.mlp.experts.{part}"
    _rewrite(quant_dir / "model.safetensors", lambda h: {**h, name: {**h[name], "dtype": dtype}})
    with pytest.raises(CheckpointError, match=re.escape(f"{quant_dir / 'model.safetensors'}: "
                                                        + words.format(name=name))):
        open_model(quant_dir)


def test_gpt_oss_experts_on_two_grpc_shards_match_in_process(family_dirs):
    """Biased, clamped experts split over two in-process gRPC shards: the greedy tokens of the in-process model."""
    from elasticmoe import LLM
    from tests.shard_util import assert_two_shards_match_in_process

    assert_two_shards_match_in_process(LLM(str(family_dirs["gpt_oss"]), dtype="float32"),
                                       [PROMPT, "Once upon a time"], max_tokens=24)


def test_gpt_oss_batch_of_different_lengths_equals_alone(family_dirs):
    """Sinks and sliding windows over padded decode rows and chunked prefills: each sequence as if alone."""
    from elasticmoe import LLM, SamplingParams

    llm = LLM(str(family_dirs["gpt_oss"]), dtype="float32", max_num_batched_tokens=16)
    alone = LLM(str(family_dirs["gpt_oss"]), dtype="float32")  # a step takes a whole prompt: no chunk
    prompts = ["Hi", "A much longer prompt about the mixture of experts and their sinks", "Once upon a time", "Z"]
    assert max(len(llm.encode(p)) for p in prompts) > 16  # the long one is prefilled in chunks when batched
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, params)
    assert len(together) == len(prompts)
    for p, out in zip(prompts, together):
        assert out.token_ids == alone.generate([p], params)[0].token_ids
