"""Linear-attention (Gated DeltaNet) layers, Qwen3-Next: per-slot state across chunked prefill, batched decodes of
different lengths, reused slots and repeated steps, against transformers alone; memory, and the strict loader."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.dispatch import ExpertsUnavailable
from tests.slot_state_cases import (LENGTHS, _assert_transformers_alone, _prompts, _run, assert_abort_zeroes,
                                    assert_batched_like_transformers, assert_slot_reused_from_zero, family_fixtures)
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_more import MORE_CASES

ckpt, ref = family_fixtures("qwen3_next", MORE_CASES["qwen3_next"])


def test_both_layer_kinds_are_built(ckpt):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.deltanet import GatedDeltaNet

    llm = LLM(str(ckpt), dtype="float32")
    kinds = [type(layer.attn) for layer in llm.engine.model.layers]
    assert kinds == [GatedDeltaNet, Attention, GatedDeltaNet]
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []


def test_long_prompt_logits_match_transformers(ckpt, ref):
    """150 tokens: three blocks of the delta rule, in one prefill and in chunks of 24 (each from the state the last
    one left)."""
    ids = _prompts([150])[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0, -1]
    for budget in (2048, 24):
        llm = LLM(str(ckpt), dtype="float32", max_num_batched_tokens=budget)
        seq = llm.engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0.0))
        while llm.engine.has_work():
            llm.engine.step()
        assert seq.output_ids == [int(theirs.argmax())]
    llm = LLM(str(ckpt), dtype="float32")
    with torch.no_grad():
        assert _rel(llm.logits(ids), ref(torch.tensor([ids])).logits[0]) < 1e-4


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes of different lengths batched, and two slots reused (their state from zero again):
    each request gets the tokens transformers gives it alone."""
    assert_batched_like_transformers(ckpt, ref, LENGTHS, seed=1, max_num_seqs=4, budget=24)


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    """One slot: a request finishes (its state stays in the slot: a finished request's slot is not zeroed), the
    next one starts at position 0 from a zero state, a 1-token prompt (the decode path) too."""
    assert_slot_reused_from_zero(ckpt, ref)


class _Blips:
    """The engine's dispatcher, failing every third dispatch of `layer`'s experts for a moment (ExpertsUnavailable):
    the step is run again, after the linear layers before that dispatch had already updated their state."""

    def __init__(self, inner, layer: int):
        self.inner, self.layer, self.calls, self.failed = inner, layer, 0, 0

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        self.calls += layer == self.layer
        if layer == self.layer and self.calls % 3 == 0:
            self.failed += 1
            raise ExpertsUnavailable(f"injected: layer {layer} unavailable for a moment")
        return self.inner.dispatch(layer, hidden, topk_ids, topk_weights)


@pytest.mark.parametrize("layer", [1, 2])
def test_a_repeated_step_reads_the_state_it_started_from(ckpt, ref, layer):
    """Steps that fail at layer 1's or 2's experts (after layer 0's, and for layer 2 its own, linear attention ran)
    and are retried: the retry reads the state at the step's start (never the failed attempt's), so every request
    gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def assert_retried_steps_exact(ckpt, ref, layer: int) -> None:
    """Three requests whose steps fail at `layer`'s experts and are retried (also test_families_conv's): each gets
    transformers' tokens, every failure retried, none failed."""
    prompts = _prompts([30, 3, 70], seed=3)
    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_num_batched_tokens=24)
    blips = _Blips(llm.engine.dispatcher, layer)
    llm.engine.dispatcher, llm.engine.retry_backoff_s = blips, (0.0,) * 8
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))
    assert blips.failed >= 4 and llm.engine.step_retries == blips.failed and llm.engine.failed_requests == 0


def test_the_cache_keeps_no_kv_for_linear_layers_and_counts_their_state(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    assert KVCache.bytes_per_token(spec, torch.float32) == 1 * a.num_kv_heads * 2 * a.head_dim * 4  # 1 of 3 layers
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer)
    assert kv == (3 * 64 // 16 + 1) * 16 * KVCache.bytes_per_token(spec, torch.float32)  # blocks of 16, and the null
    state = sum(s.conv.numel() * s.conv.element_size() + s.rec.numel() * s.rec.element_size()
                for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32)  # two copies a slot, counted
    lin = spec.linear
    assert KVCache.bytes_per_slot(spec, torch.float32) == 2 * 2 * 4 * (lin.conv_dim * 3 + 4 * 16 * 8)  # copies


def test_abort_zeroes_the_slots_state(ckpt):
    assert_abort_zeroes(ckpt, layer=0)


def test_multi_token_prediction_weights_are_ignored_as_transformers_ignores_them(ckpt, tmp_path):
    from elasticmoe.model import open_model

    ck = _copy(ckpt, tmp_path / "m")
    _add_tensors(ck, {"mtp.fc.weight": torch.ones(64, 128), "mtp.layers.0.input_layernorm.weight": torch.ones(64)})
    files = open_model(str(ck))
    assert files.names.unused() == [] and not any(n.startswith("mtp.") for n in files.names.used)


def test_attention_weights_at_a_linear_layer_fail_the_load(ckpt, tmp_path):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "s")
    _add_tensors(ck, {"model.layers.0.self_attn.k_proj.weight": torch.ones(32, 64)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        open_model(str(ck))


@pytest.mark.parametrize("key,value,message", [
    ("linear_num_value_heads", 3, r"config\.linear_num_value_heads=3 is not a multiple of linear_num_key_heads=2"),
    ("linear_conv_kernel_dim", 0, r"config\.linear_conv_kernel_dim=0: want a positive integer"),
    ("layer_types", ["linear_attention", "sliding_attention", "linear_attention"], r"config\.layer_types=.*want 3 of"),
])
def test_impossible_linear_attention_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)


def assert_config_refused(ckpt, tmp_path, key: str, value, message: str) -> None:
    """A copy of `ckpt` whose config.json sets `key` to `value` fails its open naming the field (`message`; also
    test_families_conv's)."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _copy(ckpt, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ModelSpecError, match=message):
        open_model(str(ck))


@pytest.fixture(scope="module")
def ckpt35(tmp_path_factory):
    """Qwen3.5-MoE with its vision encoder (model.visual.*, ignored) and its in_proj_qkv / z / b / a layout."""
    return make_family_checkpoint("qwen3_5_moe", tmp_path_factory.mktemp("linear35") / "q",
                                  case=MORE_CASES["qwen3_5_moe"])


def test_qwen3_5_chunked_and_batched_match_transformers_alone(ckpt35):
    ref = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(str(ckpt35), dtype=torch.float32).eval()
    prompts = _prompts([90, 1, 23, 64], seed=4)
    llm = LLM(str(ckpt35), dtype="float32", max_num_seqs=3, max_num_batched_tokens=20)
    assert llm.engine.spec.model_type == "qwen3_5_moe_text"
    _assert_transformers_alone(ref, prompts, _run(llm.engine, prompts))


@pytest.mark.parametrize("edit,message", [
    (lambda c: {**c, "tie_word_embeddings": True}, r"config\.tie_word_embeddings differs from config\.text_config"),
    (lambda c: {**c, "text_config": {**c["text_config"], "model_type": "qwen3_next"}},
     r"config\.text_config\.model_type='qwen3_next': model_type 'qwen3_5_moe' runs a 'qwen3_5_moe_text'"),
    (lambda c: {**c, "text_config": {**c["text_config"], "attn_output_gate": False}},
     r"config\.attn_output_gate=False is not supported for model_type 'qwen3_5_moe_text'"),
])
def test_a_multimodal_config_runs_its_language_model_only_as_transformers_would(ckpt35, tmp_path, edit, message):
    """The text model's config (text_config) is checked as its own family's, and the LM head tied as both say."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _copy(ckpt35, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(ModelSpecError, match=message):
        open_model(str(ck))
