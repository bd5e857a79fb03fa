"""Lightning (linear) attention layers, MiniMax: the recurrent state per slot across chunked prefill (chunks crossing
its blocks), batched decodes, reused slots and repeated steps, against transformers alone; its stored decay
buffers; memory, and the strict loader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from tests.slot_state_cases import (_prompts, assert_abort_zeroes, assert_batched_like_transformers,
                                    assert_slot_reused_from_zero, family_fixtures, variant_like_transformers)
from tests.test_families import _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_linear import assert_config_refused, assert_retried_steps_exact
from tests.test_families_more import MINIMAX, MORE_CASES

# four layers (two lightning ones before the full one: other slopes), heads of 8 (h d = 32, not the hidden 64),
# blocks of 5, a sliding window of 8 on the full layer, tanh-GELU on qkv_proj and the experts, tied embeddings
VARIANT = ("MiniMaxConfig", dict(MINIMAX, num_hidden_layers=4, head_dim=8, block_size=5, sliding_window=8,
                                 layer_types=["linear_attention", "linear_attention", "full_attention",
                                              "linear_attention"],
                                 hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True), "")
BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")


ckpt, ref = family_fixtures("minimax", MORE_CASES["minimax"])


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    return make_family_checkpoint("minimax", tmp_path_factory.mktemp("lightning_v") / "m", case=VARIANT)


def _theirs(path, ids: list[int]) -> torch.Tensor:
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0]  # [T, V]


def _edit_tensors(ck, edit) -> None:
    """Rewrite the checkpoint's model.safetensors through edit(tensors) (in place)."""
    tensors = load_file(ck / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})


def test_both_layer_kinds_are_built(ckpt):
    from elasticmoe.model.attention import Attention
    from elasticmoe.model.lightning import Lightning

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=2)
    assert [type(layer.attn) for layer in llm.engine.model.layers] == [Lightning, Attention, Lightning]
    assert sorted(llm.engine.cache.linear) == [0, 2] and llm.engine.cache.layers[0] == []
    for state in llm.engine.cache.linear.values():  # no conv window: the recurrent state alone
        assert state.conv.numel() == 0 and state.rec.shape == (2, 2, 4, 16, 16)


def test_blockwise_and_recurrent_agree_however_the_prompt_is_cut():
    """The block-wise prefill (blocks of 8), cut into chunks of 5, 13 and 19 tokens (each from the state the last
    left), and the token-by-token decode give the same outputs and state."""
    from elasticmoe.model.lightning import blockwise, recurrent
    from elasticmoe.model.lightning_spec import LightningSpec

    spec = LightningSpec(num_heads=4, head_dim=16, block_size=8, num_layers=3, act="silu", layers=(True,) * 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 37, 16, generator=gen) for _ in range(3))  # [h, L, d]
    slope = spec.slopes(0).view(-1, 1, 1)
    whole, end = blockwise(q, k, v, slope, 8, spec, None)
    outs, state = [], None
    for a, b in ((0, 5), (5, 18), (18, 37)):
        o, state = blockwise(q[:, a:b], k[:, a:b], v[:, a:b], slope, 8, spec, state)
        outs.append(o)
    steps, s = [], torch.zeros(1, 4, 16, 16)
    for i in range(37):
        o, s = recurrent(q[None, :, i], k[None, :, i], v[None, :, i], slope, s)
        steps.append(o[0])
    for got, last in ((torch.cat(outs, dim=1), state), (torch.stack(steps, dim=1), s[0])):
        assert _rel(got, whole) < 1e-5 and _rel(last, end) < 1e-5


@pytest.mark.parametrize("which", ["ckpt", "variant"])
def test_prompt_logits_match_transformers_in_one_and_in_chunks(which, request):
    """60 tokens (blocks of 8 or 5) in one prefill and in chunks of 13 and of 2 (chunks crossing the blocks, each
    from the state the last left): the same greedy token; logits of the whole prompt within 1e-4."""
    path = request.getfixturevalue(which)
    ids = _prompts([60])[0]
    theirs = _theirs(path, ids)
    for budget in (2048, 13, 2):
        llm = LLM(str(path), dtype="float32", max_num_batched_tokens=budget)
        seq = llm.engine.add_request("r", ids, SamplingParams(max_tokens=1, temperature=0.0))
        while llm.engine.has_work():
            llm.engine.step()
        assert seq.output_ids == [int(theirs[-1].argmax())]
    assert _rel(LLM(str(path), dtype="float32").logits(ids), theirs) < 1e-4


def test_variant_batches_match_transformers_alone(variant):
    llm = variant_like_transformers(variant, [33, 1, 2, 9, 21], seed=5, max_num_seqs=3, budget=7)
    spec = llm.engine.spec
    assert spec.tie_word_embeddings and spec.linear.block_size == 5 and spec.attention.sliding_window[2] == 8


def test_chunked_batched_and_reused_slots_match_transformers_alone(ckpt, ref):
    """Six requests of 1 to 150 tokens (one exactly a block) through 4 slots, 13 tokens a step: prefills cut across
    blocks beside other requests' decodes, decodes batched, two slots reused (their state from zero again)."""
    assert_batched_like_transformers(ckpt, ref, [150, 1, 37, 8, 5, 64], seed=1, max_num_seqs=4, budget=13)


def test_a_slot_reused_after_a_finished_request_starts_from_zero(ckpt, ref):
    assert_slot_reused_from_zero(ckpt, ref)


@pytest.mark.parametrize("layer", [1, 2])
def test_a_repeated_step_reads_the_state_it_started_from(ckpt, ref, layer):
    """Steps failing at layer 1's or 2's experts (after lightning layer 0, and for layer 2 its own, ran) are
    retried: the retry reads the state at the step's start, so every request gets transformers' tokens."""
    assert_retried_steps_exact(ckpt, ref, layer)


def test_the_cache_keeps_no_kv_for_lightning_layers_and_counts_their_state(ckpt):
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(ckpt), dtype="float32", max_num_seqs=3, max_model_len=64)
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    assert KVCache.bytes_per_token(spec, torch.float32) == 1 * a.num_kv_heads * 2 * a.head_dim * 4  # 1 of 3 layers
    state = sum(s.rec.numel() * s.rec.element_size() + s.conv.numel() for s in cache.linear.values())
    assert state == 3 * KVCache.bytes_per_slot(spec, torch.float32) == 3 * 2 * 2 * 4 * 16 * 16 * 4  # 2 layers, 2 copies


def test_abort_zeroes_the_slots_state(ckpt):
    assert_abort_zeroes(ckpt, layer=0)


def test_without_stored_buffers_the_slopes_are_transformers_own(ckpt, tmp_path):
    """A checkpoint without slope_rate and the decays: transformers derives them from the head count and the layer's
    depth, and so does the spec (every layer its own slopes, equal to the ones transformers saved)."""
    ck = _copy(ckpt, tmp_path / "b")
    saved = load_file(ck / "model.safetensors")
    _edit_tensors(ck, lambda t: [t.pop(n) for n in list(t) if n.rsplit(".", 1)[-1] in BUFFERS])
    ids = _prompts([45], seed=7)[0]
    llm = LLM(str(ck), dtype="float32")
    for i in (0, 2):
        layer = llm.engine.model.layers[i].attn
        assert torch.equal(layer.slope.flatten(), saved[f"model.layers.{i}.self_attn.slope_rate"].flatten())
    assert _rel(llm.logits(ids), _theirs(ck, ids)) < 1e-4


def test_stored_slopes_are_used_as_transformers_uses_them(ckpt, tmp_path):
    """slope_rate stored three times larger with the decays it makes: transformers loads and runs them, and so do
    we (the logits move far from the unchanged checkpoint's)."""
    from elasticmoe.model.lightning_spec import LightningSpec

    ck = _copy(ckpt, tmp_path / "s")
    spec = LightningSpec(num_heads=4, head_dim=16, block_size=8, num_layers=3, act="silu", layers=(True,) * 3)

    def triple(t):
        slope = t["model.layers.0.self_attn.slope_rate"] * 3
        t["model.layers.0.self_attn.slope_rate"] = slope
        for name, decay in zip(BUFFERS[1:], spec.decays(slope, 8)):
            t[f"model.layers.0.self_attn.{name}"] = decay
    _edit_tensors(ck, triple)
    ids = _prompts([45], seed=7)[0]
    ours, theirs = LLM(str(ck), dtype="float32").logits(ids), _theirs(ck, ids)
    assert _rel(ours, theirs) < 1e-4 and _rel(_theirs(ckpt, ids), theirs) > 1e-2


def test_a_decay_its_slope_does_not_make_fails_the_load(ckpt, tmp_path):
    """slope_rate changed alone: transformers' prefill would read the old decays, its decode the new slope; refused
    naming the first decay that disagrees."""
    from elasticmoe.model import CheckpointError, open_model
    from elasticmoe.model.dense import DenseModel

    ck = _copy(ckpt, tmp_path / "d")
    _edit_tensors(ck, lambda t: t["model.layers.2.self_attn.slope_rate"].mul_(3e4))
    files = open_model(str(ck))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.query_decay' is not the decay that "
                                              r"the layer's slope_rate and config\.block_size=8 make"):
        DenseModel(files.spec, files.ckpt, files.names, torch.float32, torch.device("cpu"), 64)


@pytest.mark.parametrize("tensor,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (32, 64)),  # softmax-attention weights at a lightning layer
    ("model.layers.0.self_attn.qkv_proj.bias", (192,)),  # transformers builds qkv_proj without a bias
    ("model.layers.1.self_attn.output_gate.weight", (64, 64)),  # a lightning weight at the full-attention layer
])
def test_a_tensor_transformers_would_not_load_fails_the_load(ckpt, tmp_path, tensor, shape):
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(ckpt, tmp_path / "x")
    _add_tensors(ck, {tensor: torch.ones(shape)})
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        open_model(str(ck))


@pytest.mark.parametrize("tensor,message", [
    ("model.layers.2.self_attn.output_gate.weight", r"layer 2 lacks self_attn\.output_gate\.weight"),
    ("model.layers.0.self_attn.norm.weight", r"layer 0 lacks self_attn\.norm\.weight"),
])
def test_a_missing_lightning_weight_is_named(ckpt, tmp_path, tensor, message):
    from elasticmoe import LLM as Loaded
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "m")
    _edit_tensors(ck, lambda t: t.pop(tensor))
    with pytest.raises(CheckpointError, match=message):
        Loaded(str(ck), dtype="float32")


def test_a_block_size_other_than_the_stored_decays_fails_naming_the_buffer(ckpt, tmp_path):
    """config.block_size 16 against decays stored for blocks of 8: transformers would run blocks of 16 with
    them and fail; the load names the buffer and the shape config.json wants."""
    from elasticmoe.model import CheckpointError

    ck = _copy(ckpt, tmp_path / "k")
    text = (ck / "config.json").read_text().replace('"block_size": 8', '"block_size": 16')
    (ck / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.query_decay' is \[4, 8, 1\], want "
                                              r"\[4, 16, 1\]"):
        LLM(str(ck), dtype="float32")


@pytest.mark.parametrize("key,value,message", [
    ("block_size", 0, r"config\.block_size=0: want a positive integer"),
    ("layer_types", ["linear_attention", "sliding_attention", "full_attention"],
     r"config\.layer_types=.*want 3 of full_attention / linear_attention"),
    ("mlp_beta_factor", float("nan"), r"config\.mlp_beta_factor=nan: want a finite number"),
])
def test_impossible_lightning_config_fails_naming_the_field(ckpt, tmp_path, key, value, message):
    assert_config_refused(ckpt, tmp_path, key, value, message)
