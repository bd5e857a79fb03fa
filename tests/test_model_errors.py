"""Clear errors of the model and of LLM: bad checkpoints (index, shards, headers, shapes, biases, configs) and
bad arguments, each named."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.model import CheckpointError, ModelSpecError, open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]  # the checkout the subprocess imports elasticmoe from


@pytest.fixture(scope="module")
def mixtral(tiny_models):
    return LLM(str(tiny_models["mixtral"]), dtype="float32")


def test_loading_an_expert_of_no_layer_names_it(tiny_models):
    """A (layer, expert) pair outside the model, a negative layer included (it used to wrap to the last layer, or
    raise IndexError past the end), is refused naming the pair; nothing is loaded."""
    files = open_model(str(tiny_models["qwen3_moe"]))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    for pair in [(-1, 0), (files.spec.num_layers, 0), (files.spec.moe.moe_layers[0], files.spec.moe.num_experts)]:
        with pytest.raises(ValueError, match=rf"expert \({pair[0]}, {pair[1]}\) does not exist"):
            store.load([pair])
    assert store.held() == []


def test_tensor_of_the_index_missing_from_its_shard_names_both(tmp_path):
    """The index places an (optional) q_proj bias in a shard that does not hold it: the load fails naming the
    shard and the tensor, instead of running silently without the bias."""
    from safetensors.torch import load_file, save_file

    sharded = make_tiny_model("qwen2_moe", tmp_path / "q", layers=2, experts=4, max_shard_size="100KB")
    name = "model.layers.0.self_attn.q_proj.bias"
    shard = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(sharded / shard)
    del tensors[name]
    save_file(tensors, sharded / shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{shard}.*{name}"):
        open_model(str(sharded))


@pytest.fixture(scope="module")
def sharded_mixtral(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("sh") / "m", layers=2, experts=4, max_shard_size="100KB")


@pytest.mark.parametrize("where", [3, "/etc/hostname", "../model.safetensors", ".", ""])
def test_index_placing_a_tensor_outside_the_checkpoint_names_the_index(tmp_path, sharded_mixtral, where):
    """An index entry that is no file name of the checkpoint directory (a number, an absolute path, a path out of
    it, the directory itself) fails naming the index and the tensor, not a TypeError / IsADirectoryError, and
    never reads a file outside the checkpoint."""
    bad = shutil.copytree(sharded_mixtral, tmp_path / "m")
    index = bad / "model.safetensors.index.json"
    j = json.loads(index.read_text())
    j["weight_map"]["model.norm.weight"] = where
    index.write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: .*'model\.norm\.weight'"):
        open_model(str(bad))


def test_missing_file_names_it(tmp_path, tiny_models):
    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        open_model(str(bad))
    (bad / "model.safetensors").mkdir()  # a directory where the file should be: named, not IsADirectoryError
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        open_model(str(bad))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        open_model(str(tmp_path / "nowhere"))


def test_truncated_safetensors_names_the_file(tmp_path, tiny_models):
    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        open_model(str(bad))


def _rewrite_header(file, change) -> None:
    """Rewrite a safetensors file's JSON header with change(header) -> header; the tensor bytes stay."""
    import struct

    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(change(json.loads(raw[8:8 + n]))).encode()
    header += b" " * (-len(header) % 8)
    file.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


def _short_span(h: dict) -> dict:
    """The norm keeps its [64] shape but its data_offsets cover 4 bytes (the next tensor's bytes would be read)."""
    start = h["model.norm.weight"]["data_offsets"][0]
    h["model.norm.weight"]["data_offsets"] = [start, start + 4]
    return h


@pytest.mark.parametrize("change, words", [
    (_short_span, r"'model\.norm\.weight' .*F32 \[64\] needs 256 bytes, its data_offsets .* 4"),
    (lambda h: {**h, "model.norm.weight": {"dtype": "F32", "shape": [64]}}, r"'model\.norm\.weight' .*data_offsets"),
    (lambda h: [h], r"header is not a JSON object"),
])
def test_corrupt_safetensors_header_names_the_file(tmp_path, tiny_models, change, words):
    """A header entry whose byte span disagrees with its dtype and shape (or that lacks one), or a header that is
    no object: a CheckpointError naming the file and the tensor, not a KeyError / garbage weights."""
    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    _rewrite_header(bad / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*" + words):
        open_model(str(bad))


def _mixtral_with(tiny_models, tmp_path, change) -> Path:
    """A copy of the tiny Mixtral whose tensors `change(tensors)` edited in place (written back by safetensors)."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    tensors = load_file(bad / "model.safetensors")
    change(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_untied_checkpoint_without_lm_head_names_it(tmp_path, tiny_models):
    """tie_word_embeddings false and no lm_head.weight: transformers would start from a random LM head, so the
    load fails naming the tensor instead of silently using the embeddings."""
    bad = _mixtral_with(tiny_models, tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        open_model(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    files = open_model(str(bad))  # tied: the embeddings are the LM head
    assert files.names.lm_head is None


def test_checkpoint_without_its_final_norm_names_the_usual_name(tmp_path, tiny_models):
    """No model.norm.weight: the error names it (LFM2 alone reads embedding_norm.weight in its place)."""
    bad = _mixtral_with(tiny_models, tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is not in the checkpoint"):
        open_model(str(bad))


@pytest.mark.parametrize("stored, lfm2", [("self_attn.o_proj", "self_attn.out_proj"),
                                           ("input_layernorm", "operator_norm")])
def test_another_familys_names_load_in_no_other_family(tmp_path, tiny_models, stored, lfm2):
    """LFM2's own names (out_proj, operator_norm, ...) are its family's only: a Mixtral checkpoint storing them
    where transformers' Mixtral looks for o_proj / input_layernorm is refused (transformers would start those
    weights from random), naming the tensor."""
    def rename(t: dict) -> None:
        t[f"model.layers.1.{lfm2}.weight"] = t.pop(f"model.layers.1.{stored}.weight")

    bad = _mixtral_with(tiny_models, tmp_path, rename)
    with pytest.raises(CheckpointError, match=lfm2.split(".")[-1] + "|" + stored.split(".")[-1]):
        open_model(str(bad))


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.block_sparse_moe.gate.weight", (7, 64)),  # a router for 7 of the 8 experts: silently wrong
    ("model.layers.1.input_layernorm.weight", (1,)),  # a norm weight that broadcasts
    ("model.layers.2.self_attn.k_proj.weight", (64, 64)),  # 4 kv heads where the config has 2
    ("model.embed_tokens.weight", (512, 32)),
])
def test_dense_weight_of_the_wrong_shape_names_it(tmp_path, tiny_models, name, shape):
    """A dense weight whose shape is not what config.json makes it fails the load naming the tensor, not the
    first forward deep inside (or never)."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    tensors = load_file(bad / "model.safetensors")
    tensors[name] = torch.ones(shape)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"{name!r} is {list(shape)}, want")):
        LLM(str(bad))


def test_experts_on_a_layer_the_config_makes_dense_name_it(tmp_path, tiny_models):
    """Qwen2-MoE's layer 0 holds experts but config.mlp_only_layers makes it dense: the load fails naming the layer,
    instead of running layer 0 as an MoE whose experts are never loaded (its routed output silently zero)."""
    bad = shutil.copytree(tiny_models["qwen2_moe"], tmp_path / "q")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [0, 1]}))
    with pytest.raises(CheckpointError, match=r"layers \[0\] hold experts but config\.json makes them dense"):
        open_model(str(bad))


@pytest.mark.parametrize("family, config, tensor, shape, words", [
    ("qwen2_moe", {"qkv_bias": False}, None, None, r"attn biases \['model\.layers\.0\.self_attn\.k_proj\.bias'.*"
                                                   r"config\.qkv_bias is false"),
    ("mixtral", {}, "model.layers.1.self_attn.o_proj.bias", (64,), r"attn biases .*model_type 'mixtral' has none"),
    ("deepseek_v3", {}, "model.layers.0.mlp.down_proj.bias", (64,), r"mlp biases .*model_type 'deepseek_v3' has none"),
    ("qwen3_moe", {}, "lm_head.bias", (512,), r"lm_head biases \['lm_head\.bias'\] .*'qwen3_moe' has none"),
])
def test_biases_transformers_would_drop_name_them(tmp_path, tiny_models, family, config, tensor, shape, words):
    """Projection biases that transformers' modeling never builds (config.qkv_bias false; Mixtral's attention,
    DeepSeek-V3's MLPs, Qwen3-MoE's LM head have none) are dropped there (UNEXPECTED keys): the load fails naming
    them, instead of adding them (logits ~4 off with Qwen2-MoE's q/k/v biases)."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_models[family], tmp_path / "b")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **config}))
    if tensor is not None:
        tensors = load_file(bad / "model.safetensors")
        tensors[tensor] = torch.ones(shape)
        save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=words):
        open_model(str(bad))


def test_unknown_architecture_names_config(tmp_path, tiny_models):
    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "not_a_real_moe"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json"):
        open_model(str(bad))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_model_file_that_is_not_utf8_names_it(tmp_path, sharded_mixtral, name):
    """config.json or the index holding bytes that are not UTF-8 (the only encoding of JSON files) fails naming the
    file, as invalid JSON does; config.json used to raise a bare UnicodeDecodeError naming no file."""
    bad = shutil.copytree(sharded_mixtral, tmp_path / "m")
    (bad / name).write_bytes((bad / name).read_bytes().replace(b"{", b'{"note": "caf\xe9", ', 1))
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: .*can't decode byte 0xe9"):
        open_model(str(bad))


def test_utf8_model_files_open_whatever_the_locale(tmp_path, sharded_mixtral):
    """config.json, generation_config.json and the index are read as UTF-8 (as transformers reads them), not in the
    locale's encoding: in an ASCII locale a non-ASCII text in them made the open fail, and the sampling defaults
    be dropped (a warning). open_model without the MLP shape check (as the shards and the controller open it): that
    builds a transformers model from the config already read, and importing its modeling code was ~5 s of CPU."""
    ck = shutil.copytree(sharded_mixtral, tmp_path / "m")
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        raw = json.loads((ck / name).read_text(encoding="utf-8"))
        (ck / name).write_text(json.dumps({**raw, "_name_or_path": "café/moe"}, ensure_ascii=False), encoding="utf-8")
    gen = json.loads((ck / "generation_config.json").read_text(encoding="utf-8"))
    (ck / "generation_config.json").write_text(json.dumps({**gen, "top_k": 7}, ensure_ascii=False), encoding="utf-8")
    code = ("import codecs, locale; from elasticmoe.model import open_model; "
            "from elasticmoe.engine.checkpoint_defaults import generation_config; "
            "assert codecs.lookup(locale.getpreferredencoding(False)).name == 'ascii'; "
            f"print(open_model({str(ck)!r}, check_shapes=False).spec.num_layers, "
            f"generation_config({str(ck)!r})[0]['top_k'])")
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "7"]


def test_dense_model_is_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelSpecError, match="not a Mixture-of-Experts"):
        open_model(str(tmp_path / "dense"))


def test_bad_sampling_params_name_the_field():
    for kwargs, field in [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                          ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


def test_logits_of_unusable_token_ids_name_the_field(mixtral):
    """LLM.logits of no tokens, an id outside the vocabulary or more tokens than the context: an InvalidRequest
    naming token_ids, not a reshape / index error from inside the forward; the context's full length works."""
    from elasticmoe.engine.sampling import InvalidRequest

    llm = mixtral
    longest = llm.engine.max_model_len
    for ids, words in (([], "empty"), ([5, 512], "outside the vocabulary"), ([5] * (longest + 1), f"{longest}")):
        with pytest.raises(InvalidRequest, match=f"token_ids: .*{words}"):
            llm.logits(ids)
    assert llm.logits([5] * longest).shape == (longest, 512)


def test_llm_refuses_bad_arguments_naming_them(tiny_models):
    """LLM's own arguments are checked before anything loads, each error naming its argument (max_model_len=-5
    used to fail deep in the KV cache)."""
    path = str(tiny_models["mixtral"])
    bad = {"dtype": "float8", "device": "tpu", "max_model_len": -5, "max_num_seqs": 0, "max_num_batched_tokens": 1.5}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=rf"^{name}: "):
            LLM(path, **{name: value})


def test_a_max_model_len_beyond_the_models_context_names_it(tiny_models):
    """max_model_len above the checkpoint's context (max_position_embeddings) was silently lowered to it, so a
    deployment served a shorter context than it asked for; as in vLLM, it is now refused naming max_model_len and
    the model's limit, before any expert loads; the limit itself is taken."""
    path = str(tiny_models["mixtral"])
    limit = open_model(path).spec.max_position_embeddings
    with pytest.raises(ValueError, match=rf"^max_model_len: {limit + 1} .*context length, {limit}\b"):
        LLM(path, max_model_len=limit + 1)
    assert LLM(path, max_model_len=limit).engine.max_model_len == limit


@pytest.mark.parametrize("family, kept", [("qwen3_moe", ()), ("olmoe", ()), ("mixtral", ()),
                                          ("qwen3_moe", ("tokenizer_config.json",))],
                         ids=["qwen3-none", "olmoe-none", "mixtral-none", "config-only"])
def test_a_checkpoint_without_tokenizer_files_is_refused_naming_it(tiny_models, tmp_path, family, kept):
    """A checkpoint directory with its config and weights but no tokenizer files (a download of '*.safetensors'
    and config.json only): transformers 5 made a tokenizer of special tokens only for some families, and every
    prompt then failed with "prompt: the prompt is empty"; for others its error named no file. LLM (and each
    gateway replica) now refuses it at load, naming the directory and the files it needs."""
    from elasticmoe.engine.checkpoint_defaults import load_tokenizer

    src, ckpt = tiny_models[family], tmp_path / family
    ckpt.mkdir()
    for f in src.iterdir():
        if f.name in kept or not f.name.startswith("tokenizer"):
            shutil.copy(f, ckpt / f.name)
    assert not (ckpt / "tokenizer.json").exists()
    with pytest.raises(CheckpointError, match="^" + re.escape(str(ckpt)) + ": .*needs tokenizer.json"):
        LLM(str(ckpt))
    assert load_tokenizer(src)("Water boils at")["input_ids"]  # the whole checkpoint's loads and encodes
