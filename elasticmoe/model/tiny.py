"""Builds the embedded tiny random MoE checkpoints (five HF families) with transformers, offline.

On-disk layouts (transformers 5.23; both reload with ``AutoModelForCausalLM.from_pretrained`` to
bit-identical weights and logits for all five families -- packed tensors come back mmapped at
unaligned addresses, which changes CPU rounding by ~1e-7 until the parameters are copied):

* ``per-expert`` -- what ``save_pretrained`` writes by default (it reverts its in-memory packing
  through ``conversion_mapping.py``), i.e. what real hub checkpoints look like:
  ``model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`` (qwen2_moe, qwen3_moe,
  olmoe, deepseek_v3) and ``model.layers.{l}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight``
  (mixtral, whose router is then ``block_sparse_moe.gate.weight``).
* ``packed`` -- ``save_pretrained(save_original_format=False)``: transformers' in-memory names,
  ``model.layers.{l}.mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first, then up) and
  ``model.layers.{l}.mlp.experts.down_proj`` [E, H, I]; the router is ``mlp.gate.weight`` for
  every family (mixtral included). No post-processing of the safetensors files is needed.

Weights are random (seeded); routers are scaled by ``sharpen`` so top-k router-logit gaps are wide,
and norm weights / biases / DeepSeek's ``e_score_correction_bias`` are perturbed away from their
trivial init so that a re-implementation that ignores them disagrees with transformers. The
lm_head rows of the special tokens are zero, so greedy decoding never emits them (runs to
``max_new_tokens``), and ``lm_head -= embed_tokens`` discourages 1-token greedy loops.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from elasticmoe.model.embedded import TINY_FAMILIES
from elasticmoe.model.router_margins import moe_routers, router_margins  # noqa: F401 - read as tiny.X
from elasticmoe.model.tiny_cli import DTYPE_NAMES, LAYOUTS, check_shard_size
from elasticmoe.model.tokenizer import DEFAULT_VOCAB, IM_END, SPECIAL_TOKENS, make_tokenizer

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
META_FILE = "elasticmoe_tiny.json"
INIT_STD = 0.15  # initializer_range: 0.02 gives near-uniform logits (and greedy loops) at hidden=64
ANTI_REPEAT = 1.0  # lm_head -= ANTI_REPEAT * embed_tokens: discourages greedy 1-token loops
NORM_JITTER = 0.1  # RMSNorm weights become 1 + N(0, NORM_JITTER)
SCORE_BIAS_STD = 0.2  # DeepSeek-V3 e_score_correction_bias ~ N(0, SCORE_BIAS_STD)
MAX_POSITIONS = 2048


@dataclass(frozen=True)
class TinyArgs:
    """Resolved arguments of one tiny model (also written to ``elasticmoe_tiny.json``)."""

    family: str
    layers: int
    experts: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    top_k: int
    seed: int
    sharpen: float
    dtype: str


def _resolve(family: str, **kw: Any) -> TinyArgs:
    """Validate the arguments and fill in defaults (intermediate=hidden, vocab=512, top_k=2): only None is "unset",
    a 0 is refused naming its field (it was read as unset)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {TINY_FAMILIES}")
    if kw["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {kw['dtype']!r}; expected one of {tuple(DTYPES)}")
    for name in ("layers", "experts", "hidden", "intermediate", "heads", "kv_heads", "vocab", "top_k"):
        if kw[name] is not None and int(kw[name]) < 1:
            raise ValueError(f"{name}: must be at least 1, got {kw[name]}")
    if not math.isfinite(float(kw["sharpen"])):
        raise ValueError(f"sharpen: must be a finite number, got {kw['sharpen']}")
    if not -(1 << 63) <= int(kw["seed"]) < (1 << 64) - 1:  # torch seeds with 64 bits; the routers with seed + 1
        raise ValueError(f"seed: must be in [{-(1 << 63)}, {(1 << 64) - 2}], got {kw['seed']}")
    args = TinyArgs(
        family=family, layers=int(kw["layers"]), experts=int(kw["experts"]), hidden=int(kw["hidden"]),
        intermediate=int(kw["hidden"] if kw["intermediate"] is None else kw["intermediate"]), heads=int(kw["heads"]),
        kv_heads=int(kw["kv_heads"]), vocab=int(DEFAULT_VOCAB if kw["vocab"] is None else kw["vocab"]),
        top_k=int(min(2, kw["experts"]) if kw["top_k"] is None else kw["top_k"]), seed=int(kw["seed"]),
        sharpen=float(kw["sharpen"]), dtype=kw["dtype"],
    )
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError("hidden must be divisible by heads, and heads by kv_heads")
    if not 1 <= args.top_k <= args.experts or args.layers < 1:
        raise ValueError("need layers >= 1 and 1 <= top_k <= experts")
    return args


def _deepseek_groups(experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group): >1 groups of >=2 experts when possible, enough groups kept for top_k."""
    n_group = next((g for g in (4, 2) if experts % g == 0 and experts // g >= 2), 1)
    per_group = experts // n_group
    topk_group = max(1, n_group // 2, -(-top_k // per_group))
    return n_group, min(topk_group, n_group)


def _family_fields(a: TinyArgs) -> tuple[type[PretrainedConfig], dict]:
    """Config class and the family-specific fields (MoE sizes and the family features switched on)."""
    head_dim = a.hidden // a.heads
    if a.family == "mixtral":
        return MixtralConfig, dict(intermediate_size=a.intermediate, num_local_experts=a.experts)
    if a.family == "olmoe":  # q/k norm is built in; softmax top-k weights are not renormalised
        return OlmoeConfig, dict(intermediate_size=a.intermediate, num_experts=a.experts, norm_topk_prob=False)
    if a.family == "qwen2_moe":  # layer 1 dense (mlp_only_layers) once there are >= 3 layers
        return Qwen2MoeConfig, dict(
            intermediate_size=2 * a.intermediate, moe_intermediate_size=a.intermediate,
            shared_expert_intermediate_size=a.intermediate, num_experts=a.experts, qkv_bias=True,
            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1] if a.layers >= 3 else [],
        )
    if a.family == "qwen3_moe":  # q/k norm built in; head_dim is no 5.23 config field (= hidden // heads)
        return Qwen3MoeConfig, dict(
            intermediate_size=2 * a.intermediate, moe_intermediate_size=a.intermediate, num_experts=a.experts,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    n_group, topk_group = _deepseek_groups(a.experts, a.top_k)
    return DeepseekV3Config, dict(  # MLA, grouped sigmoid routing, layer 0 dense, one shared expert
        intermediate_size=2 * a.intermediate, moe_intermediate_size=a.intermediate, n_routed_experts=a.experts,
        n_shared_experts=1, num_key_value_heads=a.heads, q_lora_rank=max(8, a.hidden // 2),
        kv_lora_rank=max(8, a.hidden // 4), qk_nope_head_dim=head_dim, qk_rope_head_dim=max(2, head_dim // 2),
        v_head_dim=head_dim, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5,
        first_k_dense_replace=1, norm_topk_prob=True,
    )


def tiny_config(a: TinyArgs, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config of a tiny model of family ``a.family``."""
    cls, fields = _family_fields(a)
    common = dict(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, num_experts_per_tok=a.top_k, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, initializer_range=INIT_STD, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype=a.dtype,
    )
    return cls(**{**common, **fields})


@torch.no_grad()
def _shape_weights(model: PreTrainedModel, a: TinyArgs) -> None:
    """Sharpen routers, jitter norm weights, randomise biases and DeepSeek's score-correction bias."""
    gen = torch.Generator().manual_seed(a.seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + NORM_JITTER * torch.randn(p.shape, generator=gen))
        elif name.endswith(".bias"):
            p.copy_(INIT_STD * torch.randn(p.shape, generator=gen))
    model.lm_head.weight.sub_(ANTI_REPEAT * model.model.embed_tokens.weight)
    model.lm_head.weight[: len(SPECIAL_TOKENS)] = 0.0  # specials get logit 0: greedy never stops early
    for _, gate in moe_routers(model):
        gate.weight.mul_(a.sharpen)
        bias = getattr(gate, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(SCORE_BIAS_STD * torch.randn(bias.shape, generator=gen))


def _cast(model: PreTrainedModel, dtype: str) -> PreTrainedModel:
    """Cast to ``dtype``, keeping fp32-strict buffers (``e_score_correction_bias``) in float32."""
    if dtype == "float32":
        return model
    keep = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    model = model.to(DTYPES[dtype])
    for name, value in keep.items():
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, value)
    return model


def build_tiny_model(
    family: str, *, layers: int = 2, experts: int = 8, hidden: int = 64, intermediate: int | None = None,
    heads: int = 4, kv_heads: int = 2, vocab: int | None = None, top_k: int | None = None, seed: int = 0,
    sharpen: float = 4.0, dtype: str = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, TinyArgs]:
    """Build the tiny model in memory (eval mode) with its tokenizer; deterministic in the arguments."""
    a = _resolve(family, layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, heads=heads,
                 kv_heads=kv_heads, vocab=vocab, top_k=top_k, seed=seed, sharpen=sharpen, dtype=dtype)
    tokenizer = make_tokenizer(a.vocab)
    config = tiny_config(a, tokenizer)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _shape_weights(model, a)
    model = _cast(model, a.dtype).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id
    gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    return model, tokenizer, a


def save_tiny_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: str | Path, *,
    layout: str = "per-expert", max_shard_size: str | int | None = None, args: TinyArgs | None = None,
) -> Path:
    """Write model + tokenizer with transformers' ``save_pretrained`` in the requested expert layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if max_shard_size is not None:
        check_shard_size(max_shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, save_original_format=(layout == "per-expert"), **kwargs)
    tokenizer.save_pretrained(out)
    meta = {"layout": layout, "max_shard_size": max_shard_size, **(asdict(args) if args else {})}
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def make_tiny_model(
    family: str, out: str | Path, *, layers: int = 2, experts: int = 8, hidden: int = 64,
    intermediate: int | None = None, heads: int = 4, kv_heads: int = 2, vocab: int | None = None,
    top_k: int | None = None, layout: str = "per-expert", max_shard_size: str | int | None = None,
    seed: int = 0, sharpen: float = 4.0, dtype: str = "float32",
) -> Path:
    """Build a tiny random ``family`` MoE checkpoint (+ tokenizer) in ``out`` and return the path.

    ``intermediate`` is the expert FFN size (default ``hidden``); dense FFNs (qwen2_moe layer 1 when
    layers >= 3, deepseek_v3 layer 0) use ``2 * intermediate``; shared experts use ``intermediate``.
    ``max_shard_size`` (e.g. "200KB") shards the weights with a ``model.safetensors.index.json``.
    ``vocab`` sets the config's vocab_size; the built-in corpus supports at most ~1400 BPE tokens, so a
    larger vocab leaves unused embedding rows. deepseek_v3 ignores ``kv_heads`` (MLA uses ``heads``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    model, tokenizer, a = build_tiny_model(
        family, layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, vocab=vocab, top_k=top_k, seed=seed, sharpen=sharpen, dtype=dtype,
    )
    return save_tiny_model(model, tokenizer, out, layout=layout, max_shard_size=max_shard_size, args=a)
