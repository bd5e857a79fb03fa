"""The model against transformers: logits, greedy generation, batching, layouts, lazy loading, pipelining."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import TINY_FAMILIES, make_tiny_model
from tests.hf_ref import transformers_greedy

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
    assert out.token_ids == transformers_greedy(ref, ids, out.token_ids)
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
