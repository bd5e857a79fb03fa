"""Checkpoints whose tensor names or layouts differ from the Llama-style ones: exposed under those names (views)."""

from __future__ import annotations

import re

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError, View
from elasticmoe.model.spec import ModelSpec

_DBRX_LAYER = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
_DBRX_DENSE = {  # DBRX block suffix -> Llama-style suffix
    "norm_attn_norm.norm_1.weight": "input_layernorm.weight",
    "norm_attn_norm.norm_2.weight": "post_attention_layernorm.weight",
    "norm_attn_norm.attn.out_proj.weight": "self_attn.o_proj.weight",
    "ffn.router.layer.weight": "mlp.gate.weight",
}


def dbrx_views(ckpt: Checkpoint, spec: ModelSpec) -> tuple[dict[str, View], set[str]]:
    """DBRX: transformer.blocks.<i>.norm_attn_norm.{norm_1, attn.Wqkv, attn.out_proj, norm_2} and
    ffn.{router.layer, experts.mlp.{w1, v1, w2}}. The fused Wqkv [H + 2 kv d, H] splits into q/k/v rows; the
    experts' w1 (gate), v1 (up) [E * I, H] give rows e*I..(e+1)*I per expert, and w2 [E * I, H] the transposed down."""
    a, inter = spec.attention, spec.moe.intermediate_size
    views = {"model.embed_tokens.weight": View("transformer.wte.weight"),
             "model.norm.weight": View("transformer.norm_f.weight")}
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    for name in ckpt.names():
        m = _DBRX_LAYER.match(name)
        if not m:
            continue
        layer, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest in _DBRX_DENSE:
            views[layer + _DBRX_DENSE[rest]] = View(name)
        elif rest == "norm_attn_norm.attn.Wqkv.weight":
            for role, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
                views[f"{layer}self_attn.{role}_proj.weight"] = View(name, rows)
            if _rows(ckpt, name) != q + 2 * kv:
                raise CheckpointError(f"{ckpt.path}: {name!r} has {_rows(ckpt, name)} rows, want {q + 2 * kv}")
        elif rest in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"):
            if _rows(ckpt, name) != spec.moe.num_experts * inter:
                raise CheckpointError(f"{ckpt.path}: {name!r} has {_rows(ckpt, name)} rows, want "
                                      f"{spec.moe.num_experts} experts x {inter}")
            proj = {"w1": "gate_proj", "v1": "up_proj", "w2": "down_proj"}[rest.rsplit(".", 1)[1]]
            for e in range(spec.moe.num_experts):
                views[f"{layer}mlp.experts.{e}.{proj}.weight"] = View(name, (e * inter, (e + 1) * inter),
                                                                     transpose=proj == "down_proj")
    return views, set()


def _rows(ckpt: Checkpoint, name: str) -> int:
    """The rows of a DBRX matrix [rows, H] whose rows the views cut; one of another rank fails naming it."""
    shape = ckpt.shape(name)
    if len(shape) != 2:
        raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} is {list(shape)}, want a [rows, hidden] matrix")
    return shape[0]


_LONGCAT = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn|mlps|input_layernorm|post_attention_layernorm)\.([01])\.?(.*)$")
_LONGCAT_MOE = {"mlp.router.classifier.weight": "mlp.gate.weight", "mlp.router.classifier.bias": "mlp.router.bias",
                "mlp.router.e_score_correction_bias": "mlp.gate.e_score_correction_bias"}
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")


def longcat_views(ckpt: Checkpoint, spec: ModelSpec) -> tuple[dict[str, View], set[str]]:
    """LongCat-Flash: decoder layer i's sublayer j (self_attn.j, mlps.j, input_layernorm.j,
    post_attention_layernorm.j) becomes engine layer 2i + j (its MLP as feed_forward); the MoE (mlp.router.classifier,
    mlp.experts) sits on engine layer 2i. experts.gate_up_proj has rows for the identity experts too: only the first
    num_experts rows are weights, and transformers' per-expert files hold never-used gate/up weights of the identity
    experts (ids >= num_experts): those are ignored, as transformers ignores them."""
    views, ignored = {}, set()
    for name in ckpt.names():
        if m := _LONGCAT.match(name):
            sub = {"mlps": "feed_forward", "self_attn": "self_attn"}.get(m.group(2), m.group(2))
            rest = f".{m.group(4)}" if m.group(4) else ".weight" if m.group(2).endswith("norm") else ""
            views[f"model.layers.{2 * int(m.group(1)) + int(m.group(3))}.{sub}{rest}"] = View(name)
        elif m := re.match(r"^model\.layers\.(\d+)\.(mlp\..+)$", name):
            layer, rest = f"model.layers.{2 * int(m.group(1))}.", m.group(2)
            if (e := _EXPERT.match(rest)) and int(e.group(1)) >= spec.moe.num_experts:
                ignored.add(name)
            elif rest == "mlp.experts.gate_up_proj":
                _check_packed_rows(ckpt, name, spec.moe.num_experts)
                views[layer + rest] = View(name, (0, spec.moe.num_experts))
            else:
                views[layer + _LONGCAT_MOE.get(rest, rest)] = View(name)
    return views, ignored



def _check_packed_rows(ckpt: Checkpoint, name: str, experts: int) -> None:
    """LongCat's packed gate_up_proj [E + identity experts, 2I, H], of which the view keeps the first E rows: one
    of another rank or with fewer rows fails naming it (it was an IndexError at the first read past its end)."""
    shape = ckpt.shape(name)
    if len(shape) != 3 or shape[0] < experts:
        raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} is {list(shape)}, want [experts, 2 x intermediate, "
                              f"hidden] with at least {experts} experts (config n_routed_experts)")


_STEP = re.compile(r"^model\.layers\.(\d+)\.(moe|share_expert)\.(.+)$")
_STEP_ROUTER = {"gate.weight": "mlp.gate.weight", "router_bias": "mlp.gate.e_score_correction_bias"}


def step3p5_views(ckpt: Checkpoint, spec: ModelSpec) -> tuple[dict[str, View], set[str]]:
    """Step-3.7's language model: moe.gate (router) and moe.router_bias, the experts stacked per projection
    (moe.{gate,up}_proj [E, I, H], moe.down_proj [E, H, I]: one view per expert) and share_expert.*, exposed as
    mlp.gate, mlp.gate.e_score_correction_bias, mlp.experts.<e>.* and mlp.shared_expert.*."""
    views: dict[str, View] = {}
    for name in ckpt.names():
        if not (m := _STEP.match(name)):
            continue
        layer, part, rest = f"model.layers.{m.group(1)}.", m.group(2), m.group(3)
        if part == "share_expert":
            views[f"{layer}mlp.shared_expert.{rest}"] = View(name)
        elif rest in _STEP_ROUTER:
            views[layer + _STEP_ROUTER[rest]] = View(name)
        elif rest in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            shape = ckpt.shape(name)
            if len(shape) != 3 or shape[0] != spec.moe.num_experts:
                raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} is {list(shape)}, want "
                                      f"[{spec.moe.num_experts} experts, out, in]")
            for e in range(spec.moe.num_experts):
                views[f"{layer}mlp.experts.{e}.{rest}"] = View(name, (e, e + 1), squeeze=True)
    return views, set()


_JETMOE = re.compile(r"^(.*layers\.\d+\.)self_attention\.(.+)$")
# JetMoE's attention: role -> (its name under self_attention., the view's under self_attn.); the views keep its
# experts' packed projections from reading as MoE experts (model.expert_names: input_linear / output_linear)
MOA_NAMES = {"k": ("kv_proj.weight", "k_proj.weight"), "v": ("kv_proj.weight", "v_proj.weight"),
             "q_experts": ("experts.input_linear.weight", "q_experts.weight"),
             "o_experts": ("experts.output_linear.weight", "o_experts.weight"),
             "moa_router": ("experts.router.layer.weight", "router.weight"),
             "moa_offset": ("experts.bias", "experts_bias")}


def jetmoe_views(ckpt: Checkpoint, spec: ModelSpec) -> tuple[dict[str, View], set[str]]:
    """JetMoE: self_attention.kv_proj [2 hk d, H] as self_attn.k_proj (its first hk d rows) and v_proj (the rest),
    and the attention experts (self_attention.experts.*) under the names of MOA_NAMES; other self_attention.* tensors
    keep their names (the load fails naming them: unused)."""
    a, views = spec.attention, {}
    width = a.num_kv_heads * a.head_dim
    stored = {s: v for s, v in MOA_NAMES.values()} | {"kv_proj.weight": None}
    for name in ckpt.names():
        m = _JETMOE.match(name)
        if not m or m.group(2) not in stored:
            continue
        attn = f"{m.group(1)}self_attn."
        if m.group(2) == "kv_proj.weight":
            if _rows(ckpt, name) != 2 * width:
                raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} has {_rows(ckpt, name)} rows, want "
                                      f"{2 * width} (keys then values: 2 x num_key_value_heads x kv_channels)")
            views[attn + "k_proj.weight"] = View(name, (0, width))
            views[attn + "v_proj.weight"] = View(name, (width, 2 * width))
        else:
            views[attn + stored[m.group(2)]] = View(name)
    return views, set()


VIEWS = {"dbrx": dbrx_views, "longcat_flash": longcat_views,  # model_type -> the views its checkpoints need
         "step3p5": step3p5_views, "jetmoe": jetmoe_views}
