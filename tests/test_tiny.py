"""Tests for the embedded tiny MoE checkpoints and their offline tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from elasticmoe.model import tiny, tiny_cli
from elasticmoe.model.tokenizer import CORPUS, _train, _trained_json, make_tokenizer

LAYERS, EXPERTS, HIDDEN, INTER = 3, 8, 64, 32
PROMPT = "The weather today is"


def _disk_tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a saved checkpoint dir (reads the index when sharded)."""
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    shapes = {}
    for name in files:
        with safe_open(str(path / name), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def _aligned(model: torch.nn.Module) -> torch.nn.Module:
    """Copy mmapped parameters to fresh memory: CPU kernels round differently on unaligned buffers."""
    for p in model.parameters():
        p.data = p.data.clone()
    return model


@pytest.fixture(scope="module", params=tiny.TINY_FAMILIES)
def family_case(request, tmp_path_factory):
    """One family: the in-memory model, its tokenizer, and both saved layouts (sharded)."""
    family = request.param
    model, tok, args = tiny.build_tiny_model(family, layers=LAYERS, experts=EXPERTS, hidden=HIDDEN, intermediate=INTER)
    root = tmp_path_factory.mktemp(family)
    dirs = {
        layout: tiny.save_tiny_model(model, tok, root / layout, layout=layout, max_shard_size="200KB", args=args)
        for layout in tiny.LAYOUTS
    }
    return family, model, tok, dirs


def test_both_layouts_reload_identically(family_case):
    family, model, tok, dirs = family_case
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    want = model.state_dict()
    for layout, path in dirs.items():
        loaded = AutoModelForCausalLM.from_pretrained(path).eval()
        got = loaded.state_dict()
        assert set(got) == set(want), layout
        assert all(torch.equal(got[k], want[k]) for k in want), layout
        with torch.no_grad():
            assert torch.equal(_aligned(loaded)(ids).logits, ref), layout


def test_disk_names_per_layout(family_case):
    family, model, _, dirs = family_case
    sparse = [i for i, _ in tiny.moe_routers(model)]
    per_expert, packed = _disk_tensors(dirs["per-expert"]), _disk_tensors(dirs["packed"])
    for path in dirs.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert all((path / f).exists() for f in index["weight_map"].values())
    for layer in sparse:
        if family == "mixtral":
            block = f"model.layers.{layer}.block_sparse_moe"
            assert per_expert[f"{block}.experts.{EXPERTS - 1}.w1.weight"] == (INTER, HIDDEN)
            assert per_expert[f"{block}.experts.0.w2.weight"] == (HIDDEN, INTER)
            assert f"{block}.gate.weight" in per_expert
        else:
            block = f"model.layers.{layer}.mlp"
            assert per_expert[f"{block}.experts.{EXPERTS - 1}.gate_proj.weight"] == (INTER, HIDDEN)
            assert per_expert[f"{block}.experts.0.up_proj.weight"] == (INTER, HIDDEN)
            assert per_expert[f"{block}.experts.0.down_proj.weight"] == (HIDDEN, INTER)
        assert not any("gate_up_proj" in k for k in per_expert)
        mlp = f"model.layers.{layer}.mlp"
        assert packed[f"{mlp}.experts.gate_up_proj"] == (EXPERTS, 2 * INTER, HIDDEN)
        assert packed[f"{mlp}.experts.down_proj"] == (EXPERTS, HIDDEN, INTER)
        assert f"{mlp}.gate.weight" in packed
        assert not any(".experts.0." in k for k in packed)
    _check_packed_matches_per_expert(family, dirs, sparse[-1])


def _check_packed_matches_per_expert(family: str, dirs: dict[str, Path], layer: int) -> None:
    """packed gate_up_proj[e] == cat(gate, up) of expert e and down_proj[e] == its down, bit for bit."""
    default = ("mlp", "gate_proj", "up_proj", "down_proj")
    block, g, u, d = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2")}.get(family, default)
    tensors = {}
    for path in dirs.values():
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        for name, file in index.items():
            if f"layers.{layer}." in name and "experts" in name:
                with safe_open(str(path / file), "pt") as f:
                    tensors[name] = f.get_tensor(name)
    gate_up = tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    down = tensors[f"model.layers.{layer}.mlp.experts.down_proj"]
    for e in range(EXPERTS):
        prefix = f"model.layers.{layer}.{block}.experts.{e}."
        assert torch.equal(gate_up[e, :INTER], tensors[prefix + f"{g}.weight"])
        assert torch.equal(gate_up[e, INTER:], tensors[prefix + f"{u}.weight"])
        assert torch.equal(down[e], tensors[prefix + f"{d}.weight"])


def test_generate_and_config(family_case):
    family, model, tok, dirs = family_case
    path = dirs["per-expert"]
    loaded = _aligned(AutoModelForCausalLM.from_pretrained(path).eval())
    ids = tok(PROMPT, return_tensors="pt").input_ids
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    out = loaded.generate(ids, **kw)
    assert out.shape[1] == ids.shape[1] + 6
    assert torch.equal(out, model.generate(ids, **kw))
    saved = json.loads((path / "config.json").read_text())
    standard = type(model.config)().to_dict()
    assert set(saved) <= set(standard) | {"architectures", "dtype", "transformers_version"}
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (512, 2048, False)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert json.loads((path / tiny.META_FILE).read_text())["family"] == family


def test_family_features(family_case):
    family, model, _, _ = family_case
    cfg, layers = model.config, model.model.layers
    sparse = [i for i, _ in tiny.moe_routers(model)]
    if family == "qwen2_moe":
        assert cfg.mlp_only_layers == [1] and sparse == [0, 2] and cfg.qkv_bias
        assert layers[0].self_attn.q_proj.bias.abs().sum() > 0
        assert hasattr(layers[0].mlp, "shared_expert_gate") and hasattr(layers[0].mlp, "shared_expert")
    elif family == "deepseek_v3":
        assert sparse == [1, 2] and cfg.first_k_dense_replace == 1 and cfg.n_group > 1 and cfg.q_lora_rank
        assert cfg.routed_scaling_factor == 2.5 and cfg.norm_topk_prob and cfg.n_shared_experts == 1
        assert layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0
    elif family in ("qwen3_moe", "olmoe"):
        assert sparse == [0, 1, 2] and hasattr(layers[0].self_attn, "q_norm")
        assert cfg.norm_topk_prob == (family == "qwen3_moe")
    else:
        assert sparse == [0, 1, 2]


def test_routers_sharpened(family_case):
    family, model, _, _ = family_case
    ids = torch.randint(5, 512, (4, 16), generator=torch.Generator().manual_seed(7))
    margins = tiny.router_margins(model, ids)
    assert margins and min(margins.values()) > 1e-4, margins
    for _, gate in tiny.moe_routers(model):
        assert gate.weight.std() > 2.5 * tiny.INIT_STD


def test_tokenizer_roundtrip_and_chat(tmp_path):
    tok = make_tokenizer()
    assert len(tok) == 512 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
    for text in ("Hello, wörld! 你好 🙂\n\ttabs  and spaces", CORPUS[:500]):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The weather today is")) < len("The weather today is") / 2
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi there"}]
    text = again.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = again.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[:2] == [1, 3] and again.decode(ids) == text
    assert _train(512).to_str() == _trained_json(512)  # retraining (uncached) is deterministic
    assert make_tokenizer().get_vocab() == tok.get_vocab()


def test_deterministic_and_seeded():
    a, _, _ = tiny.build_tiny_model("olmoe", layers=1, hidden=32, intermediate=16)
    b, _, _ = tiny.build_tiny_model("olmoe", layers=1, hidden=32, intermediate=16)
    c, _, _ = tiny.build_tiny_model("olmoe", layers=1, hidden=32, intermediate=16, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_cli_bf16_unsharded(tmp_path):
    parser = argparse.ArgumentParser()
    tiny_cli.add_cli_arguments(parser)
    args = parser.parse_args(["--family", "deepseek_v3", "--out", str(tmp_path / "m"), "--layers", "2",
                              "--experts", "4", "--top-k", "1", "--dtype", "bfloat16", "--layout", "packed"])
    assert tiny_cli.main_from_args(args) == 0
    out = tmp_path / "m"
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.gate_up_proj").get_dtype() == "BF16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.n_group == 2 and model.config.num_experts_per_tok == 1


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        tiny.make_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError):
        tiny.make_tiny_model("mixtral", tmp_path, layout="interleaved")
    with pytest.raises(ValueError):
        make_tokenizer(100)


@pytest.mark.parametrize("size", ["abc", "12XB", "KB"])
def test_a_bad_max_shard_size_is_refused_before_the_out_directory_is_touched(size, tmp_path, capsys):
    """`elasticmoe make-tiny-model --out DIR --max-shard-size abc`: the old weights in DIR were deleted, config.json
    rewritten, and only then did save_pretrained refuse the size (a message not naming the option). It is now an
    argument error naming --max-shard-size (exit 2), and DIR is as it was."""
    from elasticmoe.cli import main

    out = tiny.make_tiny_model("mixtral", tmp_path / "m", layers=1, experts=2, hidden=16, heads=2, kv_heads=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["make-tiny-model", "--family", "qwen3_moe", "--out", str(out), "--max-shard-size", size])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--max-shard-size" in err and size in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="max_shard_size"):  # the Python API refuses it first too
        tiny.make_tiny_model("mixtral", out, layers=1, experts=2, hidden=16, heads=2, kv_heads=1, max_shard_size=size)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("flag, value", [("--top-k", "0"), ("--intermediate", "0"), ("--vocab", "0"), ("--hidden", "0"),
                                         ("--heads", "0"), ("--sharpen", "nan"), ("--seed", str(1 << 64))])
def test_a_bad_size_is_refused_naming_it_and_nothing_is_written(flag, value, tmp_path, capsys):
    """`elasticmoe make-tiny-model --top-k 0` (or --intermediate 0, --vocab 0) silently wrote a top-2 model (0 read
    as "unset"), --sharpen nan wrote NaN routers, --hidden 0 failed as a ZeroDivisionError and a seed of 2**64 as
    "Overflow when unpacking long long": each is now one error line naming the field, exit 1, no directory."""
    from elasticmoe.cli import main

    out = tmp_path / "m"
    assert main(["make-tiny-model", "--family", "mixtral", "--out", str(out), flag, value]) == 1
    err = capsys.readouterr().err
    field = flag[2:].replace("-", "_")
    assert f"error: ValueError: {field}" in err and value in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
