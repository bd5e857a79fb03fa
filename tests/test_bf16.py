"""bf16/fp16 numerics against transformers' float32 logits, and expert placement invariance (issue 17, items 1-2)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticmoe import LLM
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.model.tiny import make_tiny_model

PROMPT = "The quick brown fox jumps over the lazy dog. Experts route tokens to a few specialised networks. " * 2
WIDE = {  # moderately wide, top-8 where the family allows it
    "qwen3_moe": dict(hidden=512, experts=32, intermediate=256, heads=8, kv_heads=2, top_k=8),
    "deepseek_v3": dict(hidden=256, experts=32, intermediate=128, heads=4, top_k=8),
    "mixtral": dict(hidden=512, experts=8, intermediate=512, heads=8, kv_heads=2, top_k=2),
}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return {f: make_tiny_model(f, root / f, layers=2, **kw) for f, kw in WIDE.items()}


# Real width (issue 17; Qwen3-30B-A3B width, 2 layers, fp32 checkpoint, seed 0, 109 tokens, AMD EPYC 2 vCPU, one run):
# max rel error vs transformers' fp32: ours bf16 0.755, transformers bf16 0.795 (before 5015a89/8ff2cf5: 0.236 on this
# prompt, 0.85 in the run); median per-token 0.0139 ours, 0.0161 transformers, 0.0160 before; routing sets that
# differ from fp32's (layer 0, 1): ours 7, 14; transformers 9, 19; before 6, 17.


def _token_errors(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per token: max |logits - ref| over the vocabulary / max |ref| (the max relative error's terms). -> [T]."""
    return (logits.float() - ref).abs().amax(-1) / ref.abs().max()


@pytest.mark.parametrize("family", list(WIDE))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_logits_at_least_as_close_as_transformers(family, dtype, wide_models):
    path = str(wide_models[family])
    llm = LLM(path, dtype=dtype)
    ids = llm.encode(PROMPT)
    ours = _token_errors(llm.logits(ids), ref := _hf_logits(path, torch.float32, ids))
    theirs = _token_errors(_hf_logits(path, getattr(torch, dtype), ids), ref)
    # The max over tokens is decided by routing flips: a near-tie at the top-k boundary that rounding tips one way
    # (a jump of about one expert's weight). Which tokens flip is chance, so comparing maxima compares two draws:
    # qwen3_moe H512/E32/top-8, fp16, seed 0 gave ours 0.096 (1 flip) against transformers' 0.035 (2 flips), seed 2
    # ours 0.017 against 0.050; bf16 seeds 0-3: 0.63/0.62, 0.27/0.21, 0.23/0.39, 0.15/0.31. The typical token shows
    # the arithmetic itself: ours about half of transformers' (fp16 median 0.001 against 0.002). The mean is no
    # better a judge than the max: one flip moves it (qwen3_moe fp16 here: mean 0.00469 ours, 0.00465 theirs).
    assert float(ours.median()) <= float(theirs.median()), (family, dtype, ours.median(), theirs.median())


def _hf_logits(path: str, dtype: torch.dtype, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [T, V]


# ----- placement invariance: any split of the experts over shards gives the bits of one store holding all of them

PLACE = dict(layers=2, experts=16, hidden=256, intermediate=128, heads=4, kv_heads=2, top_k=4)


@pytest.fixture(scope="module")
def place_model(tmp_path_factory):
    return str(make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("place") / "m", **PLACE))


@pytest.fixture(scope="module")
def full_store(place_model):
    """dtype -> one store holding every expert (what LocalDispatcher runs offline), loaded once."""
    cache: dict[torch.dtype, ExpertStore] = {}

    def get(dtype: torch.dtype) -> ExpertStore:
        if dtype not in cache:
            cache[dtype] = _stores(place_model, dtype, [list(range(16))])[0]
        return cache[dtype]
    return get


def _stores(path: str, dtype: torch.dtype, sets: list[list[int]]) -> list[ExpertStore]:
    files = open_model(path)
    out = []
    for experts in sets:
        s = ExpertStore(files.ckpt, files.names, files.spec, dtype, torch.device("cpu"))
        s.load((layer, e) for layer in files.spec.moe.moe_layers for e in experts)
        out.append(s)
    return out


def _routing(t: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], distinct topk_ids [T, k], softmax topk_weights [T, k] float32."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, PLACE["hidden"], generator=g).to(dtype)
    ids = torch.rand(t, PLACE["experts"], generator=g).argsort(-1)[:, : PLACE["top_k"]]
    weights = torch.rand(t, PLACE["top_k"], generator=g).softmax(-1)
    return hidden, ids, weights


def _served(stores: list[ExpertStore], owner: torch.Tensor, layer: int, hidden, ids, weights) -> torch.Tensor:
    """The gateway's way: each store gets the rows with a slot it owns (owner [T, k] store index), other slots -1;
    float64 partials summed per row, cast once to hidden's dtype (gateway.failover Step._combine)."""
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for i, store in enumerate(stores):
        mine = owner == i  # [T, k]
        rows = mine.any(1).nonzero().squeeze(1)
        if rows.numel():
            part = store.forward(layer, hidden[rows], torch.where(mine, ids, -1)[rows], weights[rows])
            out.index_add_(0, rows, part.to(torch.float64))
    return out.to(hidden.dtype)


def _owner(ids: torch.Tensor, sets: list[list[int]]) -> torch.Tensor:
    """The first store holding each slot's expert. ids [T, k] -> [T, k]."""
    where = torch.full((PLACE["experts"],), -1)
    for i, experts in reversed(list(enumerate(sets))):
        where[torch.tensor(experts)] = i
    return where[ids]


SPLITS = {
    "one": [list(range(16))],
    "two": [list(range(0, 16, 2)), list(range(1, 16, 2))],
    "three": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 3]],  # expert 3 on two stores
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("split", list(SPLITS))
def test_any_split_over_stores_gives_local_bits(dtype, split, place_model, full_store):
    full = full_store(dtype)
    stores = [full] if split == "one" else _stores(place_model, dtype, SPLITS[split])
    for layer in (0, 1):
        for t, seed in ((1, 0), (48, 2)):  # decode-sized and prefill-sized steps
            hidden, ids, weights = _routing(t, dtype, seed)
            local = LocalDispatcher(full).dispatch(layer, hidden, ids, weights).wait()
            served = _served(stores, _owner(ids, SPLITS[split]), layer, hidden, ids, weights)
            assert torch.equal(served, local), (split, dtype, layer, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_re_placement_keeps_bits(dtype, place_model, full_store):
    sets = [list(range(8)), list(range(8, 16))]
    full = full_store(dtype)
    a, b = _stores(place_model, dtype, sets)
    hidden, ids, weights = _routing(32, dtype, 3)
    want = LocalDispatcher(full).dispatch(1, hidden, ids, weights).wait()
    moved = [(layer, e) for layer in (0, 1) for e in (2, 5, 7)]  # a live move: b loads, then a drops
    b.load(moved)
    a.drop(moved)
    after = [[e for e in range(8) if e not in (2, 5, 7)], [2, 5, 7, *range(8, 16)]]
    assert a.held() == sorted((layer, e) for layer in (0, 1) for e in after[0])
    assert torch.equal(_served([a, b], _owner(ids, after), 1, hidden, ids, weights), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_splitting_one_experts_tokens_over_replicas(dtype, place_model, full_store):
    """Expert 3's tokens split between two copies (rows alternate), as the gateway does for a replicated expert."""
    full = full_store(dtype)
    a, b = _stores(place_model, dtype, [list(range(16)), [3]])
    hidden, ids, weights = _routing(64, dtype, 4)
    ids[:, 0] = 3  # every token uses expert 3: 64 rows, 32 to each copy
    owner = torch.zeros_like(ids)
    owner[1::2, 0] = 1
    want = LocalDispatcher(full).dispatch(0, hidden, ids, weights).wait()
    got = _served([a, b], owner, 0, hidden, ids, weights)
    # measured: bit-identical for bf16 and fp32 (each expert row's products do not depend on the segment's length)
    assert torch.equal(got, want), float((got.float() - want.float()).abs().max())
