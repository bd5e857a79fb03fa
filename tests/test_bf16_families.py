"""bf16/fp16 numerics of the Gated DeltaNet, sparse-attention-indexer and per-layer-attention families against
transformers' float32 forward (tests/test_bf16.py's standard), and those families served in bf16 end to end."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.batch import build_batch
from elasticmoe.model.kv_cache import KVCache
from tests.test_bf16 import PROMPT, _hf_logits, _token_errors
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

WIDE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
# two linear layers before the full one (transformers' cache needs an attention layer), 64-wide linear heads
LINEAR = dict(num_hidden_layers=3, head_dim=32, linear_key_head_dim=64, linear_value_head_dim=64,
              layer_types=["linear_attention", "linear_attention", "full_attention"])
DSA2 = dict(num_key_value_heads=8, mlp_layer_types=["dense", "sparse"])  # MLA: as many KV heads as query heads
PER_LAYER = dict(head_dim=32, mlp_layer_types=["dense", "sparse"], layer_types=["sliding_attention", "full_attention"])
CASES = {  # MORE_CASES' fields, wider, with these changes
    "qwen3_next": LINEAR,
    "qwen3_5_moe_text": LINEAR,
    "deepseek_v32": DSA2,
    "glm_moe_dsa": dict(DSA2, indexer_types=["full", "shared"]),
    "laguna": dict(PER_LAYER, num_attention_heads_per_layer=[8, 4]),
    "mellum": PER_LAYER,
}


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_families")
    out = {}
    for t, changes in CASES.items():
        cls, fields, what = MORE_CASES[t]
        case = (cls, {**fields, **{k: v for k, v in changes.items() if k not in WIDE}}, what)
        out[t] = make_family_checkpoint(t, root / t, case=case, **{**WIDE, **{k: v for k, v in changes.items()
                                                                              if k in WIDE}})
    return out


@pytest.fixture(scope="module")
def fp32_logits(wide_dirs):
    """model_type -> (prompt ids, transformers' float32 logits [T, V]), computed once."""
    cache: dict[str, tuple[list[int], torch.Tensor]] = {}

    def get(model_type: str, ids: list[int]) -> torch.Tensor:
        if model_type not in cache:
            cache[model_type] = (ids, _hf_logits(str(wide_dirs[model_type]), torch.float32, ids))
        assert cache[model_type][0] == ids
        return cache[model_type][1]
    return get


@pytest.mark.parametrize("model_type", list(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_logits_at_least_as_close_as_transformers(model_type, dtype, wide_dirs, fp32_logits):
    """Per-token median of max|logits - ref| / max|ref| (tests/test_bf16.py) no worse than transformers' own.
    Before the delta rule's output stayed float32 to the gated norm (one rounding): qwen3_5_moe_text fp16 0.00530
    against transformers' 0.00513 (now 0.00448)."""
    path = str(wide_dirs[model_type])
    llm = LLM(path, dtype=dtype)
    ids = llm.encode(PROMPT)  # 109 tokens: two blocks of the delta rule, past the indexer's top-8 and the window
    ref = fp32_logits(model_type, ids)
    ours = _token_errors(llm.logits(ids), ref)
    theirs = _token_errors(_hf_logits(path, getattr(torch, dtype), ids), ref)
    assert float(ours.median()) <= float(theirs.median()), (model_type, dtype, ours.median(), theirs.median())


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text"])
def test_delta_net_layer_rounds_once(model_type, wide_dirs):
    """One Gated DeltaNet layer on the same low-precision input: transformers rounds the conv output, the delta
    rule's output and the gated norm's weighting to the model's dtype; ours keeps them float32 and rounds once,
    before out_proj, so it is strictly closer to the float32 layer (before: bit-equal errors to transformers').
    Measured (qwen3_next layer 0, median): bf16 0.0038 against 0.0043, fp16 0.00045 against 0.00058; every layer
    and dtype of both families 0.80-0.88 of transformers'."""
    path = str(wide_dirs[model_type])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randn(1, 109, WIDE["hidden_size"], generator=torch.Generator().manual_seed(0))  # [1, T, H]
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        llm = LLM(path, dtype=str(dtype).removeprefix("torch."))
        engine = llm.engine
        cache = KVCache(engine.spec, 1, 112, engine.dtype, engine.device)  # a slot of its own: no engine's pool
        batch = build_batch([(0, 0, list(range(3, 112)))], engine.device, cache.table)
        for layer in (0, 1):
            with torch.no_grad():
                want = ref.model.layers[layer].linear_attn(xd.float())[0]  # [T, H]
                theirs = hf.model.layers[layer].linear_attn(xd)[0].float()
                ours = engine.model.layers[layer].attn.forward(xd[0], batch, cache).float()
            err = [float(((o - want).abs().amax(-1) / want.abs().max()).median()) for o in (ours, theirs)]
            assert err[0] < 0.95 * err[1], (dtype, layer, err)


@pytest.mark.parametrize("model_type", list(CASES))
def test_bf16_generation_with_chunked_prefill_and_batches(model_type, wide_dirs):
    """Five requests of 1 to 100 tokens in one bf16 engine, prefilled in chunks of up to 24 tokens beside each
    other's decodes, 6 greedy tokens each: no request fails, every token is in the vocabulary, and the first
    token of each is the one its prompt alone gives (a bf16 forward of the prompt in one piece) unless the top two
    logits there are within bf16 rounding of each other."""
    llm = LLM(str(wide_dirs[model_type]), dtype="bfloat16", max_num_batched_tokens=24, max_num_seqs=4)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (100, 1, 37, 70, 5)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seqs = [llm.engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
    while llm.engine.has_work():
        llm.engine.step()
    assert [s.error for s in seqs] == [None] * len(seqs)
    for p, s in zip(prompts, seqs):
        assert len(s.output_ids) == 6 and all(0 <= t < 512 for t in s.output_ids)
        top = llm.logits(p)[-1].topk(2)
        if float(top.values[0] - top.values[1]) > 0.05 * float(top.values[0].abs()):
            assert s.output_ids[0] == int(top.indices[0]), (model_type, len(p))
