"""Mamba2 (state-space) layers, GraniteMoeHybrid: the conv window and scan state per slot across chunked prefill,
batched decodes, reused slots and repeated steps, against transformers alone; the scan itself, memory, and the
strict loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from tests.slot_state_cases import (LENGTHS, _prompts, assert_abort_zeroes, assert_batched_like_transformers,
                                    assert_prompt_in_chunks, assert_slot_reused_from_zero,
                                    assert_used_slot_one_token_from_zero, variant_like_transformers)
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import GRANITE_HYBRID, MORE_CASES

# rotary attention, one group of B / C, a 3-tap conv without bias (a window of 2, as wide as the 2-token chunks),
# in_proj / out_proj biases, tied embeddings
ROPE = ("GraniteMoeHybridConfig", dict(GRANITE_HYBRID, position_embedding_type="rope", mamba_n_groups=1,
                                       mamba_d_conv=3, mamba_conv_bias=False, mamba_proj_bias=True,
                                       tie_word_embeddings=True), "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_family_checkpoint("granitemoehybrid", tmp_path_factory.mktemp("mamba") / "g",
                                  case=MORE_CASES["granitemoehybrid"])


@pytest.fixture(scope="module")
def ref(ckpt):
    return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def rope(tmp_path_factory):
    return make_family_checkpoint("granitemoehybrid", tmp_path_factory.mktemp("mamba_r") / "g", case=ROPE)


def test_both_layer_kinds_are_built(ckpt):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.mamba2 import Mamba2

    llm = LLM(str(ckpt), dtype="float32")
    assert [type(layer.attn) for layer in llm.engine.model.layers] == [Mamba2, Attention, Mamba2]
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []
    assert llm.engine.cache.linear[0].rec.shape[1:] == (2, 8, 16, 16)  # two copies of [heads, head_dim, d_state]
    assert llm.engine.spec.attention.rope_layers == (False,) * 3  # position_embedding_type "nope"


def test_chunked_scan_is_the_recurrence():
    """The block scan (blocks of 64 and a shorter rest, from a given state) against scan_step token by token."""
    from elasticmoe.model.mamba2 import chunked_scan, scan_step

    g = torch.Generator().manual_seed(0)
    h, p, n, length = 4, 8, 16, 150
    x, b, c = (torch.randn(h, length, d, generator=g) for d in (p, n, n))
    dt = torch.nn.functional.softplus(torch.randn(h, length, generator=g))
    a, s0 = -torch.rand(h, generator=g) * 4, torch.randn(h, p, n, generator=g)
    y, s = chunked_scan(x, dt, a, b, c, s0)
    want, state = [], s0[None]
    for t in range(length):
        out, state = scan_step(x[None, :, t], dt[None, :, t], a, b[None, :, t], c[None, :, t], state)
        want.append(out[0])
    assert _rel(y, torch.stack(want, dim=1)) < 1e-5 and _rel(s, state[0]) < 1e-5


@pytest.mark.parametrize("which", ["ckpt", "rope"])
def test_prompt_logits_match_transformers_in_one_and_in_chunks(which, request):
    """150 tokens (three blocks of the scan) in one prefill and in chunks of 24 and of 2 (no wider than the conv
    window: each chunk from the window and state the last ones left); logits of the whole prompt within 1e-4."""
    assert_prompt_in_chunks(request.getfixturevalue(which), 150)


def test_rope_variant_batches_match_transformers_alone(rope):
    llm = variant_like_transformers(rope, [33, 1, 2, 9], seed=5, max_num_seqs=3, budget=7)
    spec = llm.engine.spec
    assert spec.tie_word_embeddings and spec.linear.proj_bias and spec.attention.rope_layers == (True,) * 3


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens through 4 slots, 24 tokens a step: prefills cut in chunks beside other
    requests' decodes, decodes batched, two slots reused (their window and state from zero again)."""
    assert_batched_like_transformers(ckpt, ref, LENGTHS, seed=1, max_num_seqs=4, budget=24)


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    assert_slot_reused_from_zero(ckpt, ref)


def test_a_one_token_prompt_in_a_used_slot_starts_from_zero(ckpt, ref):
    assert_used_slot_one_token_from_zero(ckpt, ref)


@pytest.mark.parametrize("layer", [1, 2])
def test_a_repeated_step_reads_the_state_it_started_from(ckpt, ref, layer):
    """Steps failing at layer 1's or 2's experts (after Mamba layer 0, and for layer 2 its own mixer, ran) are
    retried: the retry reads the window and state at the step's start, so every request gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def test_the_cache_keeps_no_kv_for_mamba_layers_and_counts_their_state(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    assert KVCache.bytes_per_token(spec, torch.float32) == 1 * a.num_kv_heads * 2 * a.head_dim * 4  # 1 of 3 layers
    state = sum(s.conv.numel() * s.conv.element_size() + s.rec.numel() * s.rec.element_size()
                for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32)
    conv_dim = 8 * 16 + 2 * 2 * 16  # x, and B and C of 2 groups
    assert KVCache.bytes_per_slot(spec, torch.float32) == 2 * 2 * 4 * (conv_dim * 3 + 8 * 16 * 16)  # 2 layers, copies


def test_abort_zeroes_the_slots_state(ckpt):
    assert_abort_zeroes(ckpt, layer=0)


def _rewrite_config(ckpt, out, **changes):
    ck = _copy(ckpt, out)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **changes}))
    return ck


def test_a_time_step_limit_clamps_dt_as_transformers_prefill(ckpt, tmp_path):
    """time_step_limit [0.05, 0.3] (most of dt outside it): the prompt's logits are transformers' (whose scan
    clamps dt), in one prefill and in chunks of 3."""
    ck = _rewrite_config(ckpt, tmp_path / "t", time_step_limit=[0.05, 0.3])
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    ids = _prompts([70], seed=4)[0]
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    assert LLM(str(ck), dtype="float32").engine.spec.linear.dt_limit == (0.05, 0.3)
    assert _rel(LLM(str(ck), dtype="float32").logits(ids), theirs) < 1e-4
    llm = LLM(str(ck), dtype="float32", max_num_batched_tokens=3)
    seq = llm.engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0.0))
    while llm.engine.has_work():
        llm.engine.step()
    assert seq.output_ids == [int(theirs[-1].argmax())]


def test_the_hubs_layer_names_open(ckpt, tmp_path):
    """Granite 4.0-H's config.json names its layers "mamba" / "attention" (transformers renames them)."""
    from elasticmoe.model import open_model

    ck = _rewrite_config(ckpt, tmp_path / "h", layer_types=["mamba", "attention", "mamba"])
    assert open_model(str(ck)).spec.linear.layers == (True, False, True)


@pytest.mark.parametrize("tensor,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (32, 64)),  # attention weights at a Mamba layer
    ("model.layers.2.mamba.in_proj.bias", (328,)),  # a projection bias without mamba_proj_bias
    ("model.layers.1.mamba.D", (8,)),  # Mamba weights at an attention layer
])
def test_a_tensor_transformers_would_not_load_fails_the_load(ckpt, tmp_path, tensor, shape):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "x")
    _add_tensors(ck, {tensor: torch.ones(shape)})
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        open_model(str(ck))


@pytest.mark.parametrize("tensor", ["model.layers.0.mamba.A_log", "model.layers.2.mamba.conv1d.bias"])
def test_a_missing_mamba_tensor_fails_naming_it(ckpt, tmp_path, tensor):
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "m")
    (file,) = ck.glob("*.safetensors")
    tensors = load_file(str(file))
    del tensors[tensor]
    save_file(tensors, str(file), metadata={"format": "pt"})
    layer, suffix = tensor.split(".", 3)[2:]  # "0", "mamba.A_log"
    with pytest.raises(CheckpointError, match=f"layer {layer} lacks " + suffix.replace(".", r"\.") + "$"):
        LLM(str(ck), dtype="float32")


@pytest.mark.parametrize("key,value,message", [
    ("mamba_n_groups", 3, r"config\.mamba_n_groups=3 does not divide mamba_n_heads=8"),
    ("mamba_d_state", 0, r"config\.mamba_d_state=0: want a positive integer"),
    ("time_step_limit", [0.5, 0.1], r"config\.time_step_limit=\[0\.5, 0\.1\]: want \[min, max\]"),
    ("time_step_limit", None, r"config\.time_step_limit=None: want \[min, max\]"),  # transformers' scan fails on it
    ("layer_types", ["linear_attention", "sliding_attention", "linear_attention"], r"config\.layer_types=.*want 3 of"),
])
def test_impossible_mamba_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)
