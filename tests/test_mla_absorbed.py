"""MLA decode with kv_b absorbed (model/mla.py): the expand path's twin on every MLA family's decode groups, with
picks, windows, sinks and padding rows, never expanding a latent, and no worse in half precision."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.attention import Attention, step_masks
from elasticmoe.model.batch import DecodeGroup
from elasticmoe.model.kv_cache import KVCache
from elasticmoe.model.mla import Absorbed
from elasticmoe.model.spec import AttentionSpec
from elasticmoe.model.tiny import make_tiny_model
from tests.test_families import FAMILY_CASES, make_family_checkpoint
from tests.test_families_more import MORE_CASES

CASES = {t: c for t, c in {**FAMILY_CASES, **MORE_CASES}.items() if "kv_lora_rank" in c[1]}
MLA_FAMILIES = ["deepseek_v3", *CASES]  # deepseek_v3: the tiny model (elasticmoe.model.tiny)
H, R, ROPE, NOPE, V = 4, 32, 8, 16, 12  # heads, kv_lora_rank, rope, nope and value head dims


class Latents:
    """The part of a KVCache a decode group reads: layer 0's latent [rows, L, r + rope], read as KVCache reads it."""

    read = staticmethod(KVCache.read)

    def __init__(self, latent: torch.Tensor):
        self.layers = [[latent]]


def _layer(dtype: torch.dtype = torch.float32, sinks: bool = False) -> Attention:
    spec = AttentionSpec(kind="mla", num_heads=H, num_kv_heads=H, head_dim=NOPE + ROPE, v_head_dim=V,
                         scaling=(NOPE + ROPE) ** -0.5, rope_dim=ROPE, kv_lora_rank=R, qk_nope_head_dim=NOPE)
    g = torch.Generator().manual_seed(0)
    w = {"kv_b": (torch.randn(H * (NOPE + V), R, generator=g) * R**-0.5).to(dtype)}  # [h * (nope + v), r]
    if sinks:
        w["sinks"] = torch.randn(H, generator=g)
    return Attention(spec, 0, w, 1e-6)


def _group(lens: list[int], dtype: torch.dtype = torch.float32):
    """A decode group of rows of `lens` tokens, each in a block of the longest (L): (group, latent cache, q [B, h,
    d] float32). A row's positions past its length hold values, not zeros: the mask alone must keep them out."""
    g = torch.Generator().manual_seed(1)
    b, length = len(lens), max(lens)
    group = DecodeGroup(rows=torch.arange(b), slots=torch.arange(b), lens=torch.tensor(lens), max_len=length,
                        read=torch.arange(b * length).view(b, length))  # [B, L]: row i's block is block i
    lat = torch.randn(b, length, R + ROPE, generator=g).to(dtype)  # [B, L, r + rope]
    return group, Latents(lat), torch.randn(b, H, NOPE + ROPE, generator=g)


def _expansions(monkeypatch) -> list[int]:
    """The latents put through kv_b from now on (Attention._mla_kv), counted per call."""
    seen, real = [], Attention._mla_kv
    monkeypatch.setattr(Attention, "_mla_kv", lambda self, lat: seen.append(lat.shape[1]) or real(self, lat))
    return seen


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sinks", [False, True])
def test_absorbed_is_the_expand_twin_with_windows_picks_and_sinks(window, sinks, monkeypatch):
    """Rows of 3 to 17 tokens in one group (padded to 17), every key kept, a sliding window (step_masks), the
    picks as positions [B, k] (the 3-token row's last two past its length: padding, masked; the 16-token row's all
    outside a window of 5, so it attends nothing: zeros both ways, as SDPA gives, not NaN) and as a keep mask [B, L],
    with and without attention sinks: the absorbed decode equals the expand path in float32 (1e-5) and expands no
    latent (the expand path put every latent it read through kv_b)."""
    attn, lens = _layer(sinks=sinks), [3, 9, 16, 17]
    g, cache, q = _group(lens)
    mask = step_masks(SimpleNamespace(decode_groups=(g,)), {window})[0][window]  # [B, 1, 1, L]
    rng = torch.Generator().manual_seed(2)
    picked = torch.stack([torch.tensor([0, 2, 1, 3, 4]), torch.randperm(9, generator=rng)[:5], torch.arange(5),
                          torch.randperm(17, generator=rng)[:5]])  # [B, 5]
    keep = torch.zeros(len(lens), max(lens), dtype=torch.bool).scatter_(1, picked, True)  # [B, L]
    expanded = _expansions(monkeypatch)
    for p in (None, picked, keep):
        got = attn.decode_group(q, g, mask, cache, p)  # [B, h, v]
        assert expanded == [] and got.shape == (len(lens), H, V) and got.dtype == torch.float32
        want = attn.decode_group(q, g, mask, cache, p, absorb=False)
        assert expanded.pop() == (5 if p is picked else max(lens))
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()), p
        assert not got.isnan().any() and (window is None or p is None or not got[2].any())


def _on_accelerator(attn: Attention) -> Attention:
    """attn with the split an accelerator holds (Absorbed.of on any device but the CPU): views of kv_b, its dtype."""
    attn.absorbed = Absorbed.of(attn.w["kv_b"], H, NOPE, V, float32_copy=False)
    return attn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copy", [True, False])
def test_half_precision_absorbed_is_closer_to_float32_than_expanding(dtype, copy):
    """A half-precision layer (kv_b and cached latents in `dtype`) against the float32 decode of the same values:
    expanding rounds every key and value to `dtype` (kv_b's product, maybe_linear), absorbed keeps float32 from
    the cache to the output, so its error is under a hundredth of the expand path's (the model's one rounding,
    into its output, comes after either), with the CPU's float32 copy of kv_b's split (copy) or an accelerator's
    views of kv_b cast per product."""
    g, cache, q = _group([6, 11, 30, 31], dtype)
    mask = step_masks(SimpleNamespace(decode_groups=(g,)), {None})[0][None]
    low = _layer(dtype) if copy else _on_accelerator(_layer(dtype))
    f32 = Attention(low.spec, 0, {"kv_b": low.w["kv_b"].float()}, 1e-6)  # the same values, float32
    want = f32.decode_group(q, g, mask, Latents(cache.layers[0][0].float()), absorb=False)
    assert low.w["kv_b"].dtype == dtype and low.absorbed.w_uk.dtype == (torch.float32 if copy else dtype)
    err = [float((low.decode_group(q, g, mask, cache, absorb=a) - want).abs().max()) for a in (True, False)]
    assert err[1] > 1e-4 and err[0] < err[1] / 100, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_an_accelerator_holds_no_float32_copy_and_decodes_the_same(dtype):
    """Off the CPU (the meta device stands in: shapes and dtypes only) the split is kv_b's own storage in its own
    dtype, so nothing beside kv_b needs memory (a float32 copy was 2x kv_b: 4 GiB over DeepSeek-V3's 61 layers);
    on the CPU the float32 copy stays for half precision. Both decode a group to the same bits."""
    meta = Absorbed.of(torch.empty(H * (NOPE + V), R, dtype=dtype, device="meta"), H, NOPE, V)
    assert meta.w_uk.dtype == meta.w_uv.dtype == dtype and meta.w_uk.device.type == "meta"
    cpu, accel = _layer(dtype), _on_accelerator(_layer(dtype))
    kv_b = accel.w["kv_b"]
    for w in (accel.absorbed.w_uk, accel.absorbed.w_uv):
        assert w.dtype == dtype and w.untyped_storage().data_ptr() == kv_b.untyped_storage().data_ptr()
    copied = cpu.absorbed.w_uk.untyped_storage().data_ptr() != cpu.w["kv_b"].untyped_storage().data_ptr()
    assert cpu.absorbed.w_uk.dtype == torch.float32 and copied == (dtype != torch.float32)
    g, cache, q = _group([6, 11, 30, 31], dtype)
    mask = step_masks(SimpleNamespace(decode_groups=(g,)), {None})[0][None]
    assert torch.equal(accel.decode_group(q, g, mask, cache), cpu.decode_group(q, g, mask, cache))


@pytest.fixture(scope="module")
def mla_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_absorbed")
    out = {t: make_family_checkpoint(t, root / t, case=c) for t, c in CASES.items()}
    return {**out, "deepseek_v3": make_tiny_model("deepseek_v3", root / "deepseek_v3", layers=3, experts=8)}


@pytest.mark.parametrize("model_type", MLA_FAMILIES)
def test_every_mla_family_decodes_absorbed_as_expanded(model_type, mla_dirs, monkeypatch):
    """Five requests of 5 to 45 tokens decoding in one group (the shorter rows padded to the longest) through the
    engine: every attention layer's decode group, with the family's query and latent scales (LongCat's q_scale /
    kv_scale, Mistral 4's position scaling), the paged cache (blocks of 4) and DSA's picks (deepseek_v32, glm_moe_dsa:
    index topk 8, the 6-token row's picks padded past its length), is absorbed and gives the expand path's output
    (float32, 1e-5 of its largest), and reads no latent through kv_b."""
    llm = LLM(str(mla_dirs[model_type]), kv_block_size=4)
    engine, rng = llm.engine, random.Random(5)
    for i, n in enumerate((5, 20, 33, 45, 12)):
        engine.add_request(f"r{i}", [rng.randrange(3, 512) for _ in range(n)], SamplingParams(max_tokens=2))
    engine.step()  # the prefills and their first tokens
    seen, real, expanded = [], Attention.decode_group, _expansions(monkeypatch)

    def group(self, q, g, mask, cache, picked=None):
        n = len(expanded)
        out = real(self, q, g, mask, cache, picked)
        seen.append((g.lens.tolist(), picked, expanded[n:], out, real(self, q, g, mask, cache, picked, absorb=False)))
        return out

    monkeypatch.setattr(Attention, "decode_group", group)
    engine.step()  # one decode step, the five rows in one group
    linear = engine.spec.linear  # Kimi-Linear: its KDA layers have no decode group
    mla = [i for i in range(len(engine.model.layers)) if linear is None or not linear.layers[i]]
    assert mla and len(seen) == len(mla) and len(expanded) == len(seen)  # every attention layer MLA; the twins expand
    sparse = engine.spec.attention.indexer is not None
    for lens, picked, absorbed_expanded, got, want in seen:
        assert lens == [6, 13, 21, 34, 46] and absorbed_expanded == []
        assert (picked is not None and picked.shape == (5, 8)) if sparse else picked is None
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
