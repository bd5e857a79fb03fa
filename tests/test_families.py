"""Every supported transformers MoE family against transformers itself; the strict loader (rejected families and
configs: tests/test_family_refusals.py); the README's table of them: tests/test_families_table.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from elasticmoe.model.tokenizer import SPECIAL_TOKENS, make_tokenizer
from tests.hf_ref import transformers_greedy

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
MLA = dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           num_key_value_heads=4)
DSV3_MOE = dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1)
SLIDING3 = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=512)
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(8)],
                long_factor=[2.0 + 0.2 * i for i in range(8)], short_mscale=1.1, long_mscale=1.3,
                original_max_position_embeddings=512)
GPT_OSS_LIMIT = 1.0  # swiglu_limit low enough that the tiny model's gate and up projections get clamped
GRANITE = dict(intermediate_size=64, num_local_experts=8, embedding_multiplier=2.0, residual_multiplier=0.5,
               logits_scaling=2.0, attention_multiplier=0.2)

# model_type -> (transformers config class, tiny fields, what the family exercises). Supported = these + TINY_FAMILIES.
FAMILY_CASES: dict[str, tuple[str, dict, str]] = {
    "deepseek_v2": ("DeepseekV2Config", dict(**DSV3_MOE, **{**MLA, "q_lora_rank": None}, first_k_dense_replace=1,
                                             topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             routed_scaling_factor=1.5),
                    "MLA without q LoRA (V2-Lite), pairwise rotary, softmax group-limited (max) routing, "
                    "routed scaling"),
    "glm4_moe": ("Glm4MoeConfig", dict(**DSV3_MOE, first_k_dense_replace=1, n_group=2, topk_group=1,
                                       routed_scaling_factor=2.0, use_qk_norm=True, attention_bias=True, head_dim=16),
                 "sigmoid grouped routing with correction bias, partial rotary, q/k norm, qkv bias"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(**DSV3_MOE, **MLA, routed_scaling_factor=1.8,
                                                mlp_layer_types=["dense", "sparse", "sparse"]),
                      "MLA, sigmoid routing with correction bias, mlp_layer_types"),
    "dots1": ("Dots1Config", dict(**DSV3_MOE, first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True),
              "sigmoid routing with correction bias, dense first layer"),
    "exaone_moe": ("ExaoneMoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                           num_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"],
                                           first_k_dense_replace=1, **SLIDING3),
                   "sigmoid routing with correction bias, NoPE full-attention layers, sliding window"),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=64, num_local_experts=8, head_dim=16),
                   "sigmoid routing with correction bias, full-width q/k norm"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=64, num_experts=8, moe_topk=2, head_dim=16),
                       "q/k norm after the rotary, shared MLP"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, moe_num_experts=8,
                                                moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
                                                moe_layer_end_index=2, use_bias=True),
                     "softmax routing with correction bias, moe_layer_start_index, pairwise rotary, biases"),
    "flex_olmo": ("FlexOlmoConfig", dict(intermediate_size=64, num_experts=8), "post-norm blocks, full-width q/k norm"),
    "granitemoe": ("GraniteMoeConfig", GRANITE, "packed experts, embedding/residual/logit/attention multipliers"),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(**GRANITE, shared_intermediate_size=64),
                         "Granite multipliers, packed shared MLP beside the MoE"),
    "cohere2_moe": ("Cohere2MoeConfig", dict(intermediate_size=64, num_experts=8, head_dim=16, num_shared_experts=1,
                                             mlp_layer_types=["sparse"] * 3, logit_scale=0.5, **SLIDING3),
                    "parallel block, LayerNorm, pairwise rotary on sliding layers only, averaged shared expert, "
                    "logit scale"),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=64, num_local_experts=8, head_dim=16, swiglu_limit=GPT_OSS_LIMIT,
                                      rope_parameters=YARN, **SLIDING3),
                "attention sinks, alternating sliding window, router logit bias, clamped SwiGLU experts with biases, "
                "YaRN rotary; MXFP4 experts on disk and experts on gRPC shards in tests/test_gpt_oss.py"),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=64, num_local_experts=8, attention_bias=True, lm_head_bias=True,
                                    router_jitter_noise=0.2, rope_parameters=LONGROPE),
               "sparsemixer routing, LayerNorm with biases, LM-head bias, LongRoPE with short mscale "
               "(context capped at original_max_position_embeddings)"),
    "afmoe": ("AfmoeConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_shared_experts=1,
                                  head_dim=16, num_dense_layers=1, route_scale=1.5, mup_enabled=True, **SLIDING3),
              "sandwich norms, gated attention, sigmoid routing with expert bias, NoPE full layers, muP embeddings"),
}
TINY_FEATURES = {  # tests/test_model.py's families (checkpoints from elasticmoe.model.tiny)
    "mixtral": "softmax top-k, per-expert and packed layouts, sharded checkpoints",
    "qwen2_moe": "shared expert with sigmoid gate, qkv bias, dense layers (mlp_only_layers)",
    "qwen3_moe": "per-head q/k norm",
    "olmoe": "full-width q/k norm, no top-k renormalisation",
    "deepseek_v3": "MLA, sigmoid grouped routing with correction bias, routed scaling, dense first layer",
}
ROUTING_BIAS = {"glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe", "minimax_m2", "ernie4_5_moe", "afmoe"}
LOGIT_BIAS = {"gpt_oss"}  # a router bias added to the logits (mlp.router.bias)


def _perturb(model: torch.nn.Module, seed: int = 1, sharpen: float = 4.0, experts: int = 8) -> None:
    """Norm weights off 1, biases, routing biases and routers non-zero, routers sharpened (wide top-k margins),
    lm_head -= embeddings and special tokens at logit 0 (greedy neither loops on one token nor stops)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point() or "inv_freq" in name:
                continue
            # DBRX norm_1, norm_f; LongCat; ViT norm1; encoders' ln_q / ln_post (Qwen3-Omni); Step-3.7's ViT
            # layernorm_before / _after
            if re.search(r"(norm(_\d|_f|\.\d|\d)?|\.ln_\w+|layernorm_\w+)\.weight$", name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "correction_bias" in name or name.endswith("expert_bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith((".bias", "_bias")):
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("layer_scalar", "router.scale", "per_expert_scale", ".D")):  # Gemma 4, Mamba's D: ones
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif re.search(r"\.(gate|router)(\.gate|\.layer|\.wg|\.proj)?\.weight$", name) and p.dim() == 2 \
                    and p.shape[0] == experts:
                if not p.any():  # AFMoE initialises its router to zeros: routing would ignore the tokens
                    p.copy_(model.config.initializer_range * torch.randn(p.shape, generator=gen))
                p.mul_(sharpen)
            elif "_tower." in name and ((p == 0).all() or (p == 1).all()):  # Gemma 4's encoders: norm_out, scales
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        tie = getattr(model.config, "tie_word_embeddings", None)  # Step-3.7's multimodal config has none: its text's
        if not (tie if tie is not None else model.config.get_text_config().tie_word_embeddings):
            model.lm_head.weight.sub_(model.get_input_embeddings().weight)
            model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0
            if model.lm_head.bias is not None:
                model.lm_head.bias[: len(SPECIAL_TOKENS)] = 0


def make_family_checkpoint(model_type: str, out: Path, case: tuple | None = None, packed: bool = False,
                           **overrides) -> Path:
    """A tiny random checkpoint of `model_type` (its FAMILY_CASES row, or `case`), written by transformers'
    save_pretrained (3 layers, 8 experts): in the hub's per-expert layout, or with `packed` in transformers'
    in-memory names and packed experts (save_original_format=False)."""
    cls_name, fields, _ = case or FAMILY_CASES[model_type]
    tok = make_tokenizer(512)
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=2048, tie_word_embeddings=False,
                  initializer_range=0.15, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    cls = getattr(transformers, cls_name)
    known = {f.name for f in dataclasses.fields(cls)}  # DBRX: other names (attribute_map), no top-k field
    common = {cls.attribute_map.get(k, k): v for k, v in common.items() if cls.attribute_map.get(k, k) in known}
    cfg = cls(**{**common, **fields, **overrides})
    torch.manual_seed(0)
    try:
        if hasattr(cfg, "vision_config"):  # a multimodal model (its language model's fields are in text_config)
            model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except ValueError:  # Mistral 4: a causal LM outside the Auto mapping
        model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))._from_config(cfg, dtype=torch.float32)
    _perturb(model)
    model.save_pretrained(out, save_original_format=not packed)
    tok.save_pretrained(out)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: make_family_checkpoint(f, root / f) for f in FAMILY_CASES}


@pytest.mark.parametrize("model_type", sorted(FAMILY_CASES))
def test_family_matches_transformers(model_type, family_dirs):
    """Logits within 1e-4 relative in float32 and 24 greedy tokens identical, routing biases exercised."""
    from elasticmoe import LLM

    path = family_dirs[model_type]
    llm = LLM(str(path), dtype="float32")
    if model_type in ROUTING_BIAS:
        biases = [layer.router_bias for layer in llm.engine.model.layers if layer.sparse]
        assert biases and all(b is not None and b.abs().min() > 0 for b in biases)
    if model_type in LOGIT_BIAS:
        biases = [layer.router_logit_bias for layer in llm.engine.model.layers if layer.sparse]
        assert biases and all(b is not None and b.abs().min() > 0 for b in biases)
    _assert_matches(llm, path, model_type)


def trivial_tensors(path: Path) -> list[str]:
    """Floating tensors of a checkpoint left all zeros or all ones (at init): a loader ignoring or swapping them
    would still match transformers, so the test would not show they are used."""
    from safetensors.torch import load_file

    out = []
    for file in sorted(path.glob("*.safetensors")):
        out += [k for k, v in load_file(file).items() if v.is_floating_point() and ((v == 0).all() or (v == 1).all())]
    return sorted(out)


def test_no_family_checkpoint_keeps_init_constants(family_dirs):
    """Every weight of the tiny checkpoints is perturbed (AFMoE's router starts at zeros)."""
    assert {t: trivial_tensors(p) for t, p in family_dirs.items() if trivial_tensors(p)} == {}


def assert_batched_chunks_match_transformers_alone(path: Path, prompts: list[str], budget: int,
                                                  max_tokens: int, **engine_args):
    """`prompts` generated together (greedy) with prefills cut into steps of `budget` tokens (the longest prompt
    must span more than one): each one's tokens are transformers' for that prompt alone. engine_args: LLM's others
    (e.g. the KV cache's kv_block_size, kv_cache_tokens). Returns the LLM."""
    from elasticmoe import LLM, SamplingParams

    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=budget, **engine_args)
    ids = [llm.encode(p) for p in prompts]
    assert max(len(i) for i in ids) > budget
    outs = llm.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for prompt, out in zip(ids, outs):
        assert len(out.token_ids) == max_tokens
        want = transformers_greedy(ref, prompt, out.token_ids)
        assert out.token_ids == want, (prompt, out.token_ids, want)
    return llm


def _assert_matches(llm, ref_path: Path, model_type: str) -> None:
    """`llm`'s logits within 1e-4 relative of transformers' (float32) on `ref_path`, and 24 greedy tokens equal."""
    from elasticmoe import SamplingParams

    lm = getattr(transformers, json.loads((ref_path / "config.json").read_text())["architectures"][0])
    ref = lm.from_pretrained(str(ref_path), dtype=torch.float32).eval()
    assert ref.config.model_type == model_type
    ids = llm.encode(PROMPT)
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert _rel(llm.logits(ids), theirs) < 1e-4
    out = llm.generate([ids], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24 and out.token_ids == transformers_greedy(ref, ids, out.token_ids)


def test_ernie_in_transformers_packed_layout_matches(tmp_path):
    """Ernie 4.5 written with transformers' in-memory names keeps its correction bias under
    mlp.gate.moe_statics (mlp.moe_statics on the hub): it loads, bias used, and matches transformers."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("ernie4_5_moe", tmp_path / "e", packed=True)
    llm = LLM(str(ck), dtype="float32")
    assert llm.files.names.packed
    assert all(layer.router_bias is not None for layer in llm.engine.model.layers if layer.sparse)
    _assert_matches(llm, ck, "ernie4_5_moe")


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _add_tensors(ck: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add tensors to the checkpoint's model.safetensors (the one file read: a file beside it is not)."""
    from safetensors.torch import load_file, save_file

    save_file({**load_file(ck / "model.safetensors"), **tensors}, str(ck / "model.safetensors"),
              metadata={"format": "pt"})


def test_extra_tensor_fails_the_load_naming_it(family_dirs, tmp_path):
    """A tensor no role consumes (here an attention-sink vector) fails the load instead of being ignored."""
    from elasticmoe.model import CheckpointError, open_model

    bad = _copy(family_dirs["minimax_m2"], tmp_path / "m")
    _add_tensors(bad, {"model.layers.1.self_attn.sinks": torch.ones(4)})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.sinks"):
        open_model(str(bad))
    shutil.copyfile(family_dirs["minimax_m2"] / "model.safetensors", bad / "model.safetensors")
    files = open_model(str(bad))  # the rotary-free, bias-carrying original loads, and every tensor is used
    assert files.names.unused() == [] and any(n.endswith("e_score_correction_bias") for n in files.names.used)


def test_phimoe_context_capped_at_short_rope_and_top_k_2(family_dirs, tmp_path):
    """Past original_max_position_embeddings transformers rescales the rotary and recomputes its whole cache: the
    context stops there. The sparsemixer picks exactly 2 experts, whatever num_experts_per_tok says."""
    from elasticmoe.model import ModelSpecError, open_model

    ck = _copy(family_dirs["phimoe"], tmp_path / "p")
    assert open_model(str(ck)).spec.max_position_embeddings == LONGROPE["original_max_position_embeddings"]
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 3}))
    with pytest.raises(ModelSpecError, match=r"num_experts_per_tok=3: PhiMoE's sparsemixer always routes to 2"):
        open_model(str(ck))


def test_longrope_context_capped_for_any_family(tmp_path):
    """LongRoPE outside PhiMoE (here Qwen3-MoE): past original_max_position_embeddings transformers rotates every
    position with the long factors, which a KV cache of short-rotated keys cannot follow, so the context stops there;
    within it the logits are transformers'."""
    from elasticmoe import LLM

    rope = {**LONGROPE, "original_max_position_embeddings": 8}
    case = ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=64, num_experts=8, head_dim=16,
                                   rope_parameters=rope), "")
    ck = make_family_checkpoint("qwen3_moe", tmp_path / "q", case=case)
    llm = LLM(str(ck))
    assert llm.engine.max_model_len == 8
    ids = llm.encode(PROMPT)[:8]
    ref = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(llm.logits(ids), ref(torch.tensor([ids])).logits[0]) < 1e-4


def test_cohere2_moe_with_rms_norm_eps_uses_rms_norms(tmp_path):
    """Cohere2-MoE's norms are RMSNorms (no mean subtracted) when config.rms_norm_eps is set, LayerNorms otherwise."""
    from elasticmoe import LLM

    ck = make_family_checkpoint("cohere2_moe", tmp_path / "c", rms_norm_eps=1e-6)
    _assert_matches(LLM(str(ck), dtype="float32"), ck, "cohere2_moe")


def test_rotary_cache_buffers_count_as_consumed(family_dirs, tmp_path):
    from elasticmoe.model import open_model

    ok = _copy(family_dirs["dots1"], tmp_path / "d")
    _add_tensors(ok, {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    assert open_model(str(ok)).names.unused() == []


def test_layers_past_the_last_need_the_config_to_declare_them(family_dirs, tmp_path):
    """Multi-token-prediction layers (unused by transformers too) load only when the config declares them."""
    from elasticmoe.model import CheckpointError, open_model

    ck = _copy(family_dirs["glm4_moe"], tmp_path / "g")
    _add_tensors(ck, {"model.layers.3.mlp.gate.weight": torch.ones(8, 64)})
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\.mlp\.gate\.weight' lies past the config's 3 layers"):
        open_model(str(ck))
    (ck / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    assert open_model(str(ck)).names.unused() == []


@pytest.mark.parametrize("model_type,key,value", [
    ("minimax_m2", "attn_logit_softcapping", 30.0),  # a math-changing key no family here reads
    ("flex_olmo", "clip_qkv", 8.0),  # an OLMo key FlexOlmo's modeling code does not have
    ("hunyuan_v1_moe", "norm_topk_prob", False),  # transformers' HunYuan always renormalises: a stray key
])
def test_unknown_math_changing_config_key_fails_naming_it(family_dirs, tmp_path, model_type, key, value):
    from elasticmoe.model import ModelSpecError, open_model

    bad = _copy(family_dirs[model_type], tmp_path / "c")
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match=rf"config key\(s\) \['{key}'\] of model_type '{model_type}'"):
        open_model(str(bad))
