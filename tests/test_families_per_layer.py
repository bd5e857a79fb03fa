"""Attention that differs per layer (query heads, rotary per layer type, output gates) and router soft-capping:
Laguna and Mellum against transformers, batched and chunked, and the configs refused naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from tests.hf_ref import transformers_greedy
from tests.test_families import _assert_matches, make_family_checkpoint
from tests.test_families_more import MORE_CASES

GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hi", "A much longer prompt about the mixture of experts, their heads and their rotary", "Once upon a",
           "Z", "The quick brown fox jumps over the lazy dog again and again"]


@pytest.fixture(scope="module")
def laguna(tmp_path_factory):
    return make_family_checkpoint("laguna", tmp_path_factory.mktemp("laguna") / "l", case=MORE_CASES["laguna"])


@pytest.fixture(scope="module")
def mellum(tmp_path_factory):
    return make_family_checkpoint("mellum", tmp_path_factory.mktemp("mellum") / "m", case=MORE_CASES["mellum"])


def _transformers(path):
    lm = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    return lm.from_pretrained(str(path), dtype=torch.float32).eval()


def test_laguna_spec_reads_every_per_layer_field(laguna):
    """The tiny case makes each per-layer value differ: 4, 8 and 2 query heads; the sliding layers on table 1
    (10000, every dim), the full one on table 0 (500000, half the dims); softplus gate per head; capped router."""
    from elasticmoe.model import open_model

    spec = open_model(str(laguna)).spec
    a = spec.attention
    assert a.layer_heads == (4, 8, 2) and [a.layer(i).num_heads for i in range(3)] == [4, 8, 2]
    assert a.rope_sets == (1, 0, 1) and [len(inv) for inv, _ in spec.rope_tables] == [4, 8]
    assert (a.out_gate, a.gate_per_head, a.gate_name) == ("softplus", True, "g_proj")
    assert spec.moe.router_softcap == 2.0 and spec.moe.routed_scaling_factor == 1.5


@pytest.mark.parametrize("family", ["laguna", "mellum"])
def test_batch_of_different_lengths_and_chunks_equals_transformers_alone(family, request):
    """Five requests of 1 to 20 tokens in one batch, the long ones prefilled in chunks of at most 8 tokens, decoding
    together over two rotaries (Laguna: and layers of 4, 8 and 2 heads): each gets transformers' greedy tokens
    alone."""
    from elasticmoe import LLM, SamplingParams

    path = request.getfixturevalue(family)
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)
    assert llm.engine.spec.attention.rope_sets == (1, 0, 1)
    ids = [llm.encode(p) for p in PROMPTS]
    assert max(len(i) for i in ids) > 8 and min(len(i) for i in ids) <= 2
    together = llm.generate(ids, SamplingParams(**GREEDY))
    ref = _transformers(path)
    for i, out in zip(ids, together):
        assert len(out.token_ids) == GREEDY["max_tokens"]
        assert out.token_ids == transformers_greedy(ref, i, out.token_ids)


@pytest.mark.parametrize("gating", ["per-element", False])
def test_laguna_gate_per_feature_matches_transformers(gating, tmp_path):
    """config.gating "per-element" (and false, which transformers reads the same way): g_proj has a row per
    output feature [heads * head_dim, H], each feature its own softplus gate."""
    from elasticmoe import LLM

    path = make_family_checkpoint("laguna", tmp_path / "l", case=MORE_CASES["laguna"], gating=gating)
    llm = LLM(str(path), dtype="float32")
    assert not llm.engine.spec.attention.gate_per_head
    _assert_matches(llm, path, "laguna")


def _edit(src, dst, **changes):
    """A copy of checkpoint `src` whose config.json has `changes` (None deletes a key)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


@pytest.mark.parametrize("changes,match", [
    (dict(num_attention_heads_per_layer=[4, 3, 2]), r"num_attention_heads_per_layer\[1\]=3: want a positive "
                                                   r"multiple of num_key_value_heads \(2\)"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     r"config\.rope_parameters\.sliding_attention is missing"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "sliding_attention": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}),
     r"sliding_attention\.rope_type='dynamic' is not supported per layer type"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "sliding_attention": {"rope_type": "default", "rope_theta": None}}),
     r"sliding_attention\.rope_theta=None: the rotary needs a positive base"),
    (dict(gating="per-channel"), r"config\.gating='per-channel'"),
    (dict(moe_router_logit_softcapping=-1.0), r"config\.moe_router_logit_softcapping=-1\.0"),
])
def test_laguna_config_faults_are_refused_naming_the_field(laguna, tmp_path, changes, match):
    from elasticmoe.model import ModelSpecError, open_model

    with pytest.raises(ModelSpecError, match=match):
        open_model(str(_edit(laguna, tmp_path / "bad", **changes)))


def test_laguna_heads_the_config_does_not_give_a_layer_fail_the_load_naming_the_tensor(laguna, tmp_path):
    """A checkpoint of 4, 8, 2 heads read as 4, 4, 4: layer 1's q_proj has the rows of 8 heads, named."""
    from elasticmoe.model import CheckpointError, open_model
    from elasticmoe.model.dense import DenseModel

    files = open_model(str(_edit(laguna, tmp_path / "bad", num_attention_heads_per_layer=[4, 4, 4])))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.q_proj\.weight' is \[128, 64\], want "
                                              r"\[64, 64\]"):
        DenseModel(files.spec, files.ckpt, files.names, torch.float32, torch.device("cpu"), 64)


def test_mellum_partial_rotary_per_layer_type_is_refused(mellum, tmp_path):
    """Mellum's attention rotates every head dim: a partial_rotary_factor under 1 makes transformers fail every
    forward, so it is refused by name (Laguna's honours it)."""
    from elasticmoe.model import ModelSpecError, open_model

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ModelSpecError, match=r"full_attention\.partial_rotary_factor=0\.5: model_type 'mellum' "
                                             r"rotates every head dim"):
        open_model(str(_edit(mellum, tmp_path / "bad", rope_parameters=rope)))


def test_mellum_mtp_weights_load_only_when_the_config_declares_them(mellum, tmp_path):
    """Mellum checkpoints keep their prediction layer under mtp.*, which transformers skips: unused when the config
    declares num_mtp_layers, a tensor nothing consumes (named) when it does not."""
    from safetensors.torch import load_file, save_file

    from elasticmoe.model import CheckpointError, open_model

    ck = _edit(mellum, tmp_path / "m")
    extra = {"mtp.layers.0.self_attn.q_proj.weight": torch.ones(64, 64), "mtp.norm.weight": torch.ones(64)}
    save_file({**extra, **load_file(ck / "model.safetensors")}, str(ck / "model.safetensors"),
              metadata={"format": "pt"})
    files = open_model(str(ck))
    assert files.names.root == "model.layers" and files.names.unused() == []
    with pytest.raises(CheckpointError, match=r"mtp\.layers\.0\.self_attn\.q_proj\.weight"):
        open_model(str(_edit(ck, tmp_path / "bad", num_nextn_predict_layers=0)))


@pytest.mark.parametrize("family", ["laguna", "mellum"])
def test_decode_groups_over_per_layer_heads_and_rotaries_get_solo_tokens(family, request, monkeypatch):
    """With a decode group ending where a context is over twice its shortest (DECODE_GROUP_MIN 1), requests of 1 to
    60 tokens joining at different steps and prefilled in chunks of 16 decode in several groups a step, each group's
    rows over every layer's own heads and rotary table: the tokens they get alone."""
    import elasticmoe.engine.step_forward as step_forward
    import elasticmoe.model.batch as batch_mod
    from elasticmoe import LLM, SamplingParams

    monkeypatch.setattr(batch_mod, "DECODE_GROUP_MIN", 1)
    groups = []  # decode groups of each step's batch

    def build(chunks, device, table, _real=batch_mod.build_batch):
        batch = _real(chunks, device, table)
        groups.append(len(batch.decode_groups))
        return batch
    monkeypatch.setattr(step_forward, "build_batch", build)
    llm = LLM(str(request.getfixturevalue(family)), dtype="float32", max_num_seqs=6, max_num_batched_tokens=16)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 60, 3, 30, 7, 12)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    groups.clear()
    engine, seqs = llm.engine, []
    while len(seqs) < len(prompts) or engine.has_work():
        if len(seqs) < len(prompts):
            seqs.append(engine.add_request(f"r{len(seqs)}", prompts[len(seqs)], params))
        engine.step()
    assert max(groups) >= 3, "the decodes of a step were split by their context lengths"
    assert [s.output_ids for s in seqs] == alone
