"""The model against transformers: logits, greedy generation, batching, lazy loading, clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.model import CheckpointError, ModelSpecError, open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import TINY_FAMILIES, make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return {f: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval() for f, p in tiny_models.items()}


@pytest.fixture(scope="module")
def llms(tiny_models):
    return {f: LLM(str(p), dtype="float32") for f, p in tiny_models.items()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logits_match_transformers(family, llms, hf_models):
    llm, ref = llms[family], hf_models[family]
    ids = llm.encode(PROMPT)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape
    assert _rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_24_tokens_match_transformers(family, llms, hf_models):
    llm, ref = llms[family], hf_models[family]
    ids = llm.encode(PROMPT)
    out = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    with torch.no_grad():
        g = ref.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         pad_token_id=ref.config.pad_token_id)
    assert out.token_ids == g[0, len(ids):].tolist()
    assert out.finish_reason == "length" and len(out.token_ids) == 24


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_batch_of_different_lengths_equals_alone(family, llms):
    llm = llms[family]
    prompts = ["Hi", "A much longer prompt about the mixture of experts", "Once upon a time", "Zebra"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    together = llm.generate(prompts, params)
    assert len(together) == len(prompts)
    for p, out in zip(prompts, together):
        alone = llm.generate([p], params)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text


def test_sampling_is_seeded_and_stop_strings_cut(llms):
    llm = llms["mixtral"]
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True, logprobs=2)
    a, b = llm.generate(["Hello"], p)[0], llm.generate(["Hello"], p)[0]
    assert a.token_ids == b.token_ids and len(a.logprobs) == 16
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in a.logprobs)
    greedy = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    stop = next(greedy.text[i:i + 3] for i in range(1, len(greedy.text) - 2) if greedy.text[i:i + 3].strip())
    cut = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and greedy.text.startswith(cut.text)


def test_stop_token_text_is_not_in_the_output_text(llms):
    """As vLLM: the token of stop_token_ids that ends a completion stays in token_ids but its text is not rendered
    (also when it is the very first token); the text is that of the tokens before it."""
    llm = llms["mixtral"]
    greedy = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    tok = llm.tokenizer
    for k in (0, 3):
        stop_id = greedy.token_ids[k]
        assert tok.decode([stop_id], skip_special_tokens=True), "a token with text"
        out = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                     stop_token_ids=[stop_id]))[0]
        first = greedy.token_ids.index(stop_id)
        assert out.finish_reason == "stop" and out.token_ids == greedy.token_ids[:first + 1]
        assert out.text == tok.decode(greedy.token_ids[:first], skip_special_tokens=True), (k, out.text)


def test_top_p_keeps_the_smallest_prefix_reaching_it_as_transformers():
    """top_p keeps the smallest set of most likely tokens whose mass reaches top_p: where a prefix reaches it exactly
    (ties are common with bf16 logits), the next token is out, as in transformers' TopPLogitsWarper and vLLM."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from elasticmoe.engine.sampling import _filter

    cut = float("-inf")  # e.g. what top_k or min_p took out before top_p
    for logits, top_p in ((torch.tensor([1.0, 1.0, cut]), 0.5), (torch.tensor([2.0, 2.0, 2.0, 2.0, cut]), 0.5),
                          (torch.tensor([2.0, 2.0, 2.0, 2.0, cut]), 0.75), (torch.tensor([3.0, 1.0, 0.5]), 0.9)):
        ours = int((_filter(logits, 0, top_p) > cut).sum())
        theirs = int((TopPLogitsWarper(top_p)(None, logits[None].clone())[0] > cut).sum())
        assert ours == theirs, (logits.tolist(), top_p, ours, theirs)
    assert int((_filter(torch.tensor([1.0, 0.5]), 0, 1e-300) > cut).sum()) == 1  # 0 in float32: the top token stays


def test_subset_of_experts_reads_only_those_tensors(tiny_models):
    files = open_model(str(tiny_models["qwen3_moe"]))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    before = files.ckpt.tensors_read
    pairs = [(files.spec.moe.moe_layers[0], 1), (files.spec.moe.moe_layers[-1], 6)]
    store.load(pairs)
    assert files.ckpt.tensors_read - before == 3 * len(pairs)  # gate, up, down of each, nothing else
    assert store.held() == sorted(pairs)


def test_loading_an_expert_of_no_layer_names_it(tiny_models):
    """A (layer, expert) pair outside the model, a negative layer included (it used to wrap to the last layer, or
    raise IndexError past the end), is refused naming the pair; nothing is loaded."""
    files = open_model(str(tiny_models["qwen3_moe"]))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    for pair in [(-1, 0), (files.spec.num_layers, 0), (files.spec.moe.moe_layers[0], files.spec.moe.num_experts)]:
        with pytest.raises(ValueError, match=rf"expert \({pair[0]}, {pair[1]}\) does not exist"):
            store.load([pair])
    assert store.held() == []


def test_packed_layout_loads_and_matches(tmp_path, llms):
    packed = make_tiny_model("mixtral", tmp_path / "packed", layers=3, experts=8, layout="packed")
    llm = LLM(str(packed))
    assert llm.files.names.packed
    ids = llm.encode(PROMPT)
    assert _rel(llm.logits(ids), llms["mixtral"].logits(ids)) < 1e-6


def test_sharded_checkpoint_with_index(tmp_path, llms):
    sharded = make_tiny_model("mixtral", tmp_path / "sharded", layers=3, experts=8, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = llms["mixtral"].encode(PROMPT)
    assert _rel(LLM(str(sharded)).logits(ids), llms["mixtral"].logits(ids)) < 1e-6


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


def test_untied_checkpoint_without_lm_head_names_it(tmp_path, tiny_models):
    """tie_word_embeddings false and no lm_head.weight: transformers would start from a random LM head, so the
    load fails naming the tensor instead of silently using the embeddings."""
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_models["mixtral"], tmp_path / "m")
    tensors = load_file(bad / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        open_model(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    files = open_model(str(bad))  # tied: the embeddings are the LM head
    assert files.names.lm_head is None


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


def test_logits_of_unusable_token_ids_name_the_field(llms):
    """LLM.logits of no tokens, an id outside the vocabulary or more tokens than the context: an InvalidRequest
    naming token_ids, not a reshape / index error from inside the forward; the context's full length works."""
    from elasticmoe.engine.sampling import InvalidRequest

    llm = llms["mixtral"]
    longest = llm.engine.max_model_len
    for ids, words in (([], "empty"), ([5, 512], "outside the vocabulary"), ([5] * (longest + 1), f"{longest}")):
        with pytest.raises(InvalidRequest, match=f"token_ids: .*{words}"):
            llm.logits(ids)
    assert llm.logits([5] * longest).shape == (longest, 512)


def test_pipelined_micro_batches_equal_one_batch(llms):
    """The gateway's two-micro-batch pipeline (remote dispatchers) gives the tokens of the single-batch path."""
    from elasticmoe.engine.engine import Engine
    from elasticmoe.model.dispatch import LocalDispatcher

    class Deferred(LocalDispatcher):  # like a remote dispatcher: dispatch returns at once, work on wait()
        remote = True

        def dispatch(self, layer, hidden, topk_ids, topk_weights):
            outer = self

            class Later:
                def wait(self):
                    return outer.store.forward(layer, hidden, topk_ids, topk_weights).to(hidden.dtype)
            return Later()

    llm = llms["deepseek_v3"]
    prompts = ["Hi", "A much longer prompt about the mixture of experts", "Once upon a time", "Zebra"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine = Engine(llm.files, Deferred(llm.store), max_num_seqs=8, tokenizer=llm.tokenizer, pipeline_min_tokens=2)
    seqs = [engine.add_request(f"p{i}", llm.encode(p), params) for i, p in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in seqs] == [o.token_ids for o in llm.generate(prompts, params)]


def test_generate_without_params_takes_the_checkpoints_generation_config(tmp_path, tiny_models):
    """As vLLM's LLM.generate: no sampling_params -> generation_config.json's sampling values (here top_k 1:
    sampling that can only pick the argmax), not SamplingParams()' temperature 1 over the whole vocabulary."""
    import json
    import shutil

    path = tmp_path / "mixtral"
    shutil.copytree(tiny_models["mixtral"], path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1, "temperature": 0.7}))
    llm = LLM(str(path))
    assert llm.get_default_sampling_params() == SamplingParams(top_k=1, temperature=0.7)
    prompts = ["The expert said", "Once upon a time"]
    greedy = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0.0))]
    torch.manual_seed(0)
    assert [o.token_ids for o in llm.generate(prompts)] == greedy


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
