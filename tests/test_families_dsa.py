"""DeepSeek sparse attention (model/indexer.py): the picks matter, chunked and batched requests get transformers'
tokens, the index keys live in the KV cache, and configs or checkpoints it cannot run are refused by name."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from tests.hf_ref import transformers_greedy
from tests.test_families import PROMPT, _add_tensors, _copy, _rel, make_family_checkpoint
from tests.test_families_more import MORE_CASES

DSA_FAMILIES = ["deepseek_v32", "glm_moe_dsa"]


@pytest.fixture(scope="module")
def dsa_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsa")
    return {t: make_family_checkpoint(t, root / t, case=MORE_CASES[t]) for t in DSA_FAMILIES}


def _reference(path, **config):
    cfg = transformers.AutoConfig.from_pretrained(path)
    for key, value in config.items():
        setattr(cfg, key, value)
    return transformers.AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", DSA_FAMILIES)
def test_the_picks_change_transformers_logits(model_type, dsa_dirs):
    """The tiny config's index_topk (8) is under the prompt's 32 tokens: transformers' own logits move far when every
    key is kept instead (so matching them, test_families_more, needs the picks right), and ours are theirs."""
    from elasticmoe import LLM

    path = dsa_dirs[model_type]
    llm = LLM(str(path))
    ids = llm.encode(PROMPT)
    assert len(ids) > 3 * MORE_CASES[model_type][1]["index_topk"]
    with torch.no_grad():
        sparse = _reference(path)(torch.tensor([ids])).logits[0]
        dense = _reference(path, index_topk=4096)(torch.tensor([ids])).logits[0]
    assert _rel(dense, sparse) > 0.1 and (dense.argmax(-1) != sparse.argmax(-1)).sum() > 4
    assert _rel(llm.logits(ids), sparse) < 1e-4


@pytest.mark.parametrize("model_type", DSA_FAMILIES)
def test_chunked_and_batched_requests_get_transformers_tokens(model_type, dsa_dirs):
    """Six requests of 3 to 45 tokens in one engine, prefilled in chunks of up to 16 tokens beside each other's
    decodes (the index keys of earlier chunks read from the cache), 12 greedy tokens each: each gets the tokens
    transformers generates for it alone."""
    from elasticmoe import LLM, SamplingParams

    path = dsa_dirs[model_type]
    llm = LLM(str(path), max_num_seqs=4, max_num_batched_tokens=16)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (45, 3, 20, 33, 9, 27)]
    ref = _reference(path)
    got = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in got] == [12] * 6
    assert [o.token_ids for o in got] == [transformers_greedy(ref, p, o.token_ids) for p, o in zip(prompts, got)]


@pytest.mark.parametrize("model_type", DSA_FAMILIES)
def test_index_keys_are_cached_counted_and_cleared(model_type, dsa_dirs):
    """Each layer running its own indexer caches one index_head_dim key a token beside its MLA latent (a layer
    sharing the previous one's picks none): written by a request, counted in bytes_per_token, zeroed with the slot."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.model.attention import KVCache

    llm = LLM(str(dsa_dirs[model_type]))
    spec, cache = llm.engine.spec, llm.engine.cache
    a = spec.attention
    own = [i for i in range(spec.num_layers) if a.indexer.own[i]]
    assert own == ([0, 2] if model_type == "glm_moe_dsa" else [0, 1, 2])
    assert KVCache.bytes_per_token(spec, torch.float32) == 4 * (spec.num_layers * a.cache_width
                                                                + len(own) * a.indexer.head_dim)
    llm.generate([llm.encode(PROMPT)], SamplingParams(max_tokens=4, temperature=0.0))
    keys = [cache.index_keys(i) for i in own]  # [blocks, block_size, index_head_dim]
    assert all(len(cache.layers[i]) == 1 for i in range(spec.num_layers) if i not in own)  # the MLA latent alone
    (slot,) = [s for s in range(cache.num_slots) if cache.of_slot(keys[0], s).any()]
    assert all(k.shape[-1] == a.indexer.head_dim and cache.of_slot(k, slot)[:30].abs().min() > 0 for k in keys)
    cache.clear(slot, 40)
    assert all(not k.any() for k in keys)


def test_decode_reads_only_the_picked_latents_and_matches_the_mask(dsa_dirs, monkeypatch):
    """Four decode rows of 6 to 46 tokens in one group (index_topk 8): each row's attention reads only the 8
    latents its indexer picked (it read all 46 of the group's longest context, masking the rest) and expands none
    through kv_b (absorbed into the query: tests/test_mla_absorbed.py; it expanded the 8), and gives what masking
    every unpicked key of the full context gives and what expanding the picked latents gives (float32, 1e-5). The
    row shorter than topk picks its 6 positions and 2 padded ones, which stay masked (the cache holds zeros there:
    a zero key attended would move its output); the longer rows pick 8 of their own positions, none padded."""
    import elasticmoe.model.attention as attention
    from elasticmoe import LLM, SamplingParams

    llm = LLM(str(dsa_dirs["deepseek_v32"]))
    engine, topk = llm.engine, llm.engine.spec.attention.indexer.topk
    rng = random.Random(5)
    for i, n in enumerate((5, 20, 33, 45)):
        engine.add_request(f"r{i}", [rng.randrange(3, 512) for _ in range(n)], SamplingParams(max_tokens=2))
    engine.step()  # the prefills; their first tokens
    reads, expanded, seen = [], [], []
    real_latents, real_kv, real_group = (getattr(attention.Attention, n) for n in
                                         ("_mla_latents", "_mla_kv", "decode_group"))

    def group(self, q, g, mask, cache, picked=None):
        monkeypatch.setattr(attention.Attention, "_mla_latents",  # the latents read, and put through kv_b, per call
                            lambda s, c, index: reads.append(tuple(index.shape)) or real_latents(s, c, index))
        monkeypatch.setattr(attention.Attention, "_mla_kv",
                            lambda s, lat: expanded.append(tuple(lat.shape)) or real_kv(s, lat))
        out = real_group(self, q, g, mask, cache, picked)
        monkeypatch.setattr(attention.Attention, "_mla_latents", real_latents)
        monkeypatch.setattr(attention.Attention, "_mla_kv", real_kv)
        keep = torch.zeros(len(g.lens), g.max_len, dtype=torch.bool)  # [B, L]: the picks as a mask
        keep = picked if picked.dtype == torch.bool else keep.scatter_(1, picked, True)
        twins = [real_group(self, q, g, mask, cache, keep), real_group(self, q, g, mask, cache, picked, absorb=False)]
        seen.append((picked, g.lens.tolist(), g.max_len, out, twins))
        return out

    monkeypatch.setattr(attention.Attention, "decode_group", group)
    engine.step()  # one decode step, the four rows in one group
    assert len(seen) == engine.spec.num_layers and reads == [(4, topk)] * len(seen) and expanded == []
    for picked, lens, max_len, gathered, twins in seen:
        assert lens == [6, 21, 34, 46] and max_len == 46 and picked.shape == (4, topk)
        assert all((gathered - twin).abs().max() < 1e-5 for twin in twins)
        assert sorted(picked[0].tolist())[:6] == list(range(6)) and (picked[0] >= 6).sum() == 2
        for row, n in zip(picked[1:], lens[1:]):
            assert len(set(row.tolist())) == topk and row.max() < n


def test_contexts_within_topk_get_no_picks(dsa_dirs, monkeypatch):
    """Contexts of no more than index_topk (8) keys keep every key: the indexer gives no picks (None) for their
    prefill chunks and decode group (contexts of 3 to 7), so no key is picked, gathered or masked
    beyond causality and length (it gave keep masks holding every key)."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.model.indexer import Indexer

    llm = LLM(str(dsa_dirs["deepseek_v32"]))
    seen, real = [], Indexer.picks
    monkeypatch.setattr(Indexer, "picks", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    llm.generate([[5, 6, 7], [9, 10, 11, 12, 13]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(seen) == 3 * llm.engine.spec.num_layers  # a prefill step and two decode steps
    assert [len(p) for p in seen] == [2] * 3 + [1] * 6 and all(x is None for p in seen for x in p)


def _with_config(src, dst, **changes):
    bad = _copy(src, dst)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, **changes}))
    return bad


@pytest.mark.parametrize("changes,message", [
    (dict(index_head_dim=4), r"config\.index_head_dim=4: the indexer rotates its first qk_rope_head_dim \(8\)"),
    (dict(index_topk=0), r"config\.index_topk=0: the sparse-attention indexer needs a positive integer"),
    (dict(layer_types=["indexed_attention", "full_attention", "indexed_attention"]),
     r"config\.layer_types=.*want 3 of 'indexed_attention'"),
])
def test_configs_the_indexer_cannot_run_fail_naming_the_field(dsa_dirs, tmp_path, changes, message):
    from elasticmoe.model import ModelSpecError, open_model

    with pytest.raises(ModelSpecError, match=message):
        open_model(str(_with_config(dsa_dirs["deepseek_v32"], tmp_path / "c", **changes)))


def test_a_missing_or_misshapen_indexer_tensor_fails_naming_it(dsa_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError

    ck = _copy(dsa_dirs["deepseek_v32"], tmp_path / "m")
    tensors = load_file(ck / "model.safetensors")
    del tensors["model.layers.2.self_attn.indexer.wk.weight"]
    save_file(tensors, str(ck / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 2 lacks self_attn\.indexer\.wk\.weight"):
        LLM(str(ck))
    _add_tensors(ck, {"model.layers.2.self_attn.indexer.wk.weight": torch.ones(8, 64)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.self_attn\.indexer\.wk\.weight' is \[8, 64\], "
                                              r"want \[16, 64\]"):
        LLM(str(ck))


def test_a_shared_indexer_schedule_needs_a_first_full_layer_and_no_shared_weights(dsa_dirs, tmp_path):
    """GLM-MoE-DSA's "shared" layers reuse the previous layer's picks: a first layer with nothing to reuse fails
    (transformers fails its first forward), and so do indexer weights on a shared layer (transformers builds none
    there and would drop them)."""
    from elasticmoe import LLM
    from elasticmoe.model import CheckpointError, ModelSpecError, open_model

    src = dsa_dirs["glm_moe_dsa"]
    assert open_model(str(src)).spec.attention.indexer.own == (True, False, True)
    bad = _with_config(src, tmp_path / "s", indexer_types=["shared", "full", "full"])
    with pytest.raises(ModelSpecError, match=r"config\.indexer_types\[0\]='shared': the first layer must run its own"):
        open_model(str(bad))
    ck = _copy(src, tmp_path / "w")
    _add_tensors(ck, {"model.layers.1.self_attn.indexer.wk.weight": torch.ones(16, 64)})
    with pytest.raises(CheckpointError, match=r"layer 1 holds self_attn\.indexer\.wk\.weight, but config\.json makes "
                                              r"it share the previous layer's picks"):
        LLM(str(ck))


@pytest.mark.parametrize("model_type,feature", [
    ("axk2", "sigmoid-gated RMSNorms"), ("dots3_note_text", "attention output gate"),
    ("minimax_m3_vl_text", "block-sparse indexer"), ("mistral_large4_text", "KV sharing across layers"),
])
def test_families_with_more_than_the_indexer_stay_refused_naming_it(model_type, feature):
    """Their modeling code holds an indexer and more besides (read in transformers 5.23): now that the indexer runs,
    the refusal names what else they lack, from the config alone."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from elasticmoe.model import ModelSpecError
    from elasticmoe.model.spec import check_model_type

    with pytest.raises(ModelSpecError, match=rf"model_type '{model_type}' is not supported: .*{feature}"):
        check_model_type(CONFIG_MAPPING[model_type]())
