"""Where each weight lives in a checkpoint: per-expert or packed expert tensors, routers, shared experts, norms."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.expert_check import check_expert_dtypes, check_expert_shapes, check_experts
from elasticmoe.model.expert_names import LAYER, ExpertRef, expert_parts, expert_ref
from elasticmoe.model.extras import BESIDE_NORMS, layer_extras, model_extras
from elasticmoe.model.mlp_shapes import built_shapes
from elasticmoe.model.renames import MOA_NAMES
from elasticmoe.model.spec import ModelSpec

log = logging.getLogger(__name__)
_ROUTERS = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight", "router.gate.weight",
            "router.proj.weight")  # Gemma 4: a normed router (model.extras)
_ROUTER_BIASES = ("gate.e_score_correction_bias", "e_score_correction_bias", "router.e_score_correction_bias",
                  "expert_bias", "moe_statics.e_score_correction_bias",
                  "gate.moe_statics.e_score_correction_bias",  # Ernie 4.5: hub, then transformers' in-memory name
                  "experts.e_score_correction_bias")  # Laguna's hub name
_SHARED = ("shared_expert", "shared_experts", "shared_mlp")
ATTN = {  # role -> checkpoint suffix under "<layer>.self_attn."
    "q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
    "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias", "o_bias": "o_proj.bias",
    "q_norm": "q_norm.weight", "k_norm": "k_norm.weight",
    "q_norm_rope": "query_layernorm.weight", "k_norm_rope": "key_layernorm.weight",  # HunYuan: after rotary
    "gate": "gate_proj.weight",  # AFMoE: sigmoid gate on the attention output (Laguna: g_proj, AttentionSpec.gate_name)
    "gate_offset": "gate_bias",  # Beam: one bias per head added to that gate (whatever attention_bias says)
    "sinks": "sinks",  # GPT-OSS: per-head attention sink logits
    "q_a": "q_a_proj.weight", "q_a_bias": "q_a_proj.bias", "q_a_norm": "q_a_layernorm.weight", "q_b": "q_b_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight", "kv_a_bias": "kv_a_proj_with_mqa.bias",
    "kv_a_norm": "kv_a_layernorm.weight", "kv_b": "kv_b_proj.weight",
    # DeepSeek sparse attention's lightning indexer (model.indexer); its key LayerNorm's bias is index_norm_b
    "index_q": "indexer.wq_b.weight", "index_k": "indexer.wk.weight", "index_norm": "indexer.k_norm.weight",
    "index_norm_b": "indexer.k_norm.bias", "index_weights": "indexer.weights_proj.weight",
}
# Norms of one decoder layer by block layout: role -> module name (a tuple: alternatives, the first found). A
# family's own names for a role (ModelSpec.tensor_names: LFM2's operator_norm, ffn_norm) replace these.
NORMS = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "sandwich": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                 "mlp_in": "pre_mlp_layernorm", "mlp_out": "post_mlp_layernorm"},
    # GLM-4's four norms (Kolibri: transformers' names, then the hub's post_attn_norm / post_ffn_norm)
    "glm4": {"attn_in": "input_layernorm", "attn_out": ("post_self_attn_layernorm", "post_attn_norm"),
             "mlp_in": "post_attention_layernorm", "mlp_out": ("post_mlp_layernorm", "post_ffn_norm")},
    "gemma": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
              "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "parallel": {"attn_in": "input_layernorm"},
    "shortcut": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
}
# Buffers that hold no weights (rotary caches): present in some checkpoints, consumed by construction.
_DERIVED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|rotary_emb\.\w+_cached|inv_freq)$")


@dataclass(frozen=True)
class LayerNames:
    """Non-expert weights of one decoder layer, by role."""

    prefix: str  # "model.layers.3."
    block: str | None  # MoE block prefix ("model.layers.3.mlp."), None for a dense layer
    router: str | None
    router_bias: str | None  # e_score_correction_bias
    shared: dict[str, str] | None  # shared expert MLP: gate/up/down (or gate_up/down) and optional biases
    shared_gate: str | None  # sigmoid gate of the shared expert (Qwen2-MoE)
    dense: dict[str, str] | None  # dense MLP of a dense layer, same roles
    attn: dict[str, str] = field(default_factory=dict)  # role (see ATTN) -> name
    norms: dict[str, str] = field(default_factory=dict)  # role (see NORMS) -> weight name; "<role>_bias" -> bias
    router_logit_bias: str | None = None  # GPT-OSS: added to the router logits
    linear: dict[str, str] = field(default_factory=dict)  # a per-slot-state layer's: role -> name (its spec's weights)
    extras: dict[str, str] = field(default_factory=dict)  # role -> name: layer scalar, PLE, router scales (extras)


class WeightNames:
    """Indexes a checkpoint's tensor names once: layer prefixes, MoE blocks, every expert's tensors, and what
    is used, so that a tensor the model would silently ignore fails the load (`check_all_used`)."""

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec):
        self.ckpt, self.spec = ckpt, spec
        self.root = self._find_root(ckpt)
        self.experts: dict[tuple[int, int], ExpertRef] = {}
        self.blocks: dict[int, str] = {}
        self.used: set[str] = set()
        self.renamed = dict(spec.tensor_names)  # role -> this family's own name for it (LFM2's)
        self._index_experts(spec.num_layers, spec.moe.num_experts)
        self.layers = [self._layer(i) for i in range(spec.num_layers)]
        self.packed = any(r.gate_up is not None for r in self.experts.values())
        base = self.root.rsplit("layers", 1)[0]  # "model."
        self.embed = self._need(f"{base}embed_tokens.weight")
        self.norm = self._need(f"{base}{self.renamed.get('final', 'norm')}.weight")
        self.norm_bias = self._first(f"{base}norm.bias")
        self.lm_head = self._first("lm_head.weight")
        if self.lm_head is None and not spec.tie_word_embeddings:
            raise CheckpointError(f"{ckpt.path}: tensor 'lm_head.weight' is not in the checkpoint and "
                                  "config.tie_word_embeddings is false (transformers would use a random LM head)")
        self.lm_head_bias = self._first("lm_head.bias")
        self._check_biases("lm_head", [self.lm_head_bias] if self.lm_head_bias else [])
        self.extras = model_extras(base, spec.per_layer_input > 0, self._need)  # PLE's

    @staticmethod
    def _find_root(ckpt: Checkpoint) -> str:
        for name in ckpt.names():
            m = LAYER.match(name)
            if m and not name.startswith("mtp."):  # Mellum's prediction layers (mtp.layers.<i>): not the model's
                return m.group("root")
        raise CheckpointError(f"{ckpt.path}: no tensors named '...layers.<i>...' in the checkpoint")

    def _index_experts(self, num_layers: int, num_experts: int) -> None:
        parts, self.blocks = expert_parts(self.ckpt, self.root, num_layers, num_experts, self.spec.mtp_layers)
        check_experts(self.ckpt, parts, num_experts)
        if over := sorted(k for k in parts if k[1] >= num_experts):
            (layer, e), name = over[0], min(parts[over[0]].values())
            raise CheckpointError(f"{self.ckpt.file_of(name)}: {name!r} is expert {e} of layer {layer}, but "
                                  f"config.json gives it {num_experts} experts")
        extras_ok = self.spec.moe.expert_act == "swiglu_clamped"
        for (layer, e), p in parts.items():
            self.experts[(layer, e)] = expert_ref(self.ckpt.path, layer, e, p, extras_ok, self.spec.model_type)
            self.used.update(p.values())
        if self.spec.moe.expert_act != "swiglu_clamped":
            check_expert_shapes(self.ckpt, self.experts, self.spec.hidden_size, self.spec.moe.intermediate_size)
        check_expert_dtypes(self.ckpt, self.experts)

    def _first(self, *names: str) -> str | None:
        name = next((n for n in names if n in self.ckpt), None)
        if name is not None:
            self.used.add(name)
        return name

    def _check_biases(self, part: str, biases: list[str]) -> None:
        """Biases of the `part` projections are used only where transformers builds them (it drops the others)."""
        why = self.spec.biases_dropped(part) if biases else None
        if why:
            raise CheckpointError(f"{self.ckpt.path}: {part} biases {sorted(biases)[:2]} in the checkpoint, but {why} "
                                  "(transformers would drop them)")

    def _need(self, name: str) -> str:
        if self._first(name) is None:
            raise CheckpointError(f"{self.ckpt.path}: tensor {name!r} is not in the checkpoint")
        return name

    def _mlp(self, prefix: str) -> dict[str, str] | None:
        """A gated MLP under `prefix`: gate/up/down (or packed gate_up/down), with biases where stored."""
        for roles in ({"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
                      {"gate": "w1", "up": "w3", "down": "w2"}, {"gate_up": "input_linear", "down": "output_linear"}):
            names = {r: f"{prefix}{m}.weight" for r, m in roles.items()}
            if all(n in self.ckpt for n in names.values()):
                names.update({f"{r}_bias": f"{prefix}{m}.bias" for r, m in roles.items()
                              if f"{prefix}{m}.bias" in self.ckpt})
                self._check_biases("mlp", [n for r, n in names.items() if r.endswith("_bias")])
                self.used.update(names.values())
                return names
        return None

    def _layer(self, i: int) -> LayerNames:
        prefix = f"{self.root}.{i}."
        sinks = ("sinks", "softmax_offset", "attention_sink_bias")  # Flint's: softmax_offset; MiMo's hub names
        lin = self.spec.linear is not None and self.spec.linear.layers[i]  # a linear layer has no self_attn
        moa = {r: view for r, (_, view) in MOA_NAMES.items()} if self.spec.attention.moa_experts else {}  # JetMoE
        names = {**ATTN, **moa, "gate": f"{self.spec.attention.gate_name}.weight"}
        alts = {**{r: (self.renamed.get(r, s),) for r, s in names.items()}, "sinks": sinks}  # role -> names
        attn = {role: self._first(*(f"{prefix}self_attn.{n}" for n in alts[role]))
                for role in names if not lin and (role != "sinks" or self.spec.attention.layer(i).sinks)}
        attn = {role: n for role, n in attn.items() if n is not None}
        linear = {r: n for r, s in self.spec.linear.weights.items()  # s: a suffix or alternatives (Kimi-Linear's)
                  if (n := self._first(*(prefix + x for x in ((s,) if isinstance(s, str) else s))))} if lin else {}
        self._check_biases("attn", [n for role, n in attn.items() if role.endswith("_bias")])
        norms: dict[str, str] = {}
        block = self.blocks.get(i)
        beside = BESIDE_NORMS if self.spec.moe_beside_mlp and block is not None else {}
        for role, modules in [*NORMS[self.spec.block].items(), *beside.items()]:
            modules = (modules,) if isinstance(modules, str) else modules  # alternative names, first found
            modules = (self.renamed[role],) if role in self.renamed else modules
            module = next((m for m in modules if f"{prefix}{m}.weight" in self.ckpt), modules[0])
            norms[role] = self._need(f"{prefix}{module}.weight")
            if bias := self._first(f"{prefix}{module}.bias"):
                norms[role + "_bias"] = bias
        extras = layer_extras(prefix, block, self.spec, self._first, self._need)
        post_mlp = (prefix + "post_mlp_layernorm.weight", prefix + "mlp.post_mlp_layernorm.weight")
        if block is None:
            if self.spec.moe_out_norm:  # A.X-K1 stores it on dense layers too, where transformers ignores it
                self._first(*post_mlp)
            dense = self._mlp(prefix + "mlp.") or self._mlp(prefix + "feed_forward.")
            if dense is None and "dense" in self.renamed:  # Kimi-Linear's hub: block_sparse_moe.gate_proj...
                dense = self._mlp(f"{prefix}{self.renamed['dense']}.")
            return LayerNames(prefix, None, None, None, None, None, dense, attn, norms, linear=linear, extras=extras)
        if self.spec.moe_out_norm:
            norms["mlp_out"] = self._first(*post_mlp) or self._need(post_mlp[1])
        router = self._first(*(block + r for r in _ROUTERS))
        if router is None:
            raise CheckpointError(f"{self.ckpt.path}: MoE layer {i} ({block}) has no router weight "
                                  f"({block}gate.weight)")
        bias = self._first(*(block + b for b in _ROUTER_BIASES), prefix + "moe.router.expert_bias")  # Kolibri's hub
        if bias is not None and not self.spec.moe.router_bias:  # left unused: check_all_used names it
            self.used.discard(bias)
            bias = None
        shared = next((s for s in (self._mlp(f"{block}{n}.") for n in _SHARED) if s), None)
        if shared is None:  # GraniteMoeShared: the shared MLP sits beside the MoE block
            shared = self._mlp(f"{prefix}shared_mlp.")
        shared_gate = self._first(block + "shared_expert_gate.weight")
        logit_bias = self._first(block + "router.bias")
        dense = self._mlp(prefix + "feed_forward.") if self.spec.block == "shortcut" else None  # LongCat: both
        if self.spec.moe_beside_mlp:  # Gemma 4: the layer's dense MLP beside its experts
            dense = self._mlp(prefix + "mlp.")
        return LayerNames(prefix, block, router, bias, shared, shared_gate, dense, attn, norms, logit_bias, linear,
                          extras)

    def unused(self) -> list[str]:
        """Checkpoint tensors the model does not consume (speculative-decoding layers past the last one excepted, and
        those under mtp. when the config declares such layers: Mellum's, which transformers skips too)."""
        out = []
        for name in self.ckpt.names():
            m = LAYER.match(name)
            mtp = m is not None and int(m.group("layer")) >= self.spec.num_layers  # bounded in _index_experts
            mtp = mtp or (self.spec.mtp_layers > 0 and name.startswith("mtp."))
            if name in self.used or _DERIVED.search(name) or mtp:
                continue
            out.append(name)
        return sorted(out)

    def check_all_used(self) -> None:
        """Fail, naming them, when the checkpoint holds tensors the spec would ignore."""
        extra = self.unused()
        if extra:
            shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            raise CheckpointError(f"{self.ckpt.path}: {len(extra)} tensor(s) that the {self.spec.model_type!r} spec "
                                  f"does not use (running without them would be silently wrong): {shown}")

    def check_mlp_shapes(self, config: Any) -> None:
        """Dense and shared-expert MLP weights at the shapes transformers builds from config.json (it refuses
        others); their sizes are read from the tensors, so nothing else would catch an intermediate size the config
        does not state. Checked against the model transformers builds on the meta device (no memory); skipped,
        with a warning naming why, where transformers cannot build it."""
        checked = [n for layer in self.layers for n in [*(layer.dense or {}).values(), *(layer.shared or {}).values()]]
        try:
            want = built_shapes(config, checked)
        except Exception as e:  # noqa: BLE001 -- the check is an extra; the load goes on without it
            log.warning("%s: dense and shared-expert MLP shapes not checked: transformers cannot build the model "
                        "it describes (%s: %s)", self.ckpt.path / "config.json", type(e).__name__, e)
            return
        for name in checked:
            got = self.ckpt.shape(name)
            if want[name] is not None and got != want[name]:
                raise CheckpointError(f"{self.ckpt.file_of(name)}: {name!r} is {list(got)}, but config.json "
                                      f"makes it {list(want[name])} (transformers refuses it)")

    def expert(self, layer: int, expert: int) -> ExpertRef:
        ref = self.experts.get((layer, expert))
        if ref is None:
            raise CheckpointError(f"{self.ckpt.path}: no weights for expert {expert} of layer {layer}")
        return ref

