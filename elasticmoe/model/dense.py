"""The dense half: embeddings, attention with a KV cache, norms, routers, shared experts, dense MLPs, LM head."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear

from elasticmoe.model.attention import Attention, KVCache, step_masks
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.dispatch import Dispatcher
from elasticmoe.model.layers import Rotary, gated_mlp, rms_norm, route
from elasticmoe.model.names import LayerNames, WeightNames
from elasticmoe.model.spec import ModelSpec

_ATTN = {  # role -> checkpoint suffix under "<layer>.self_attn."
    "q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
    "q_bias": "q_proj.bias", "k_bias": "k_proj.bias", "v_bias": "v_proj.bias", "o_bias": "o_proj.bias",
    "q_norm": "q_norm.weight", "k_norm": "k_norm.weight",
    "q_a": "q_a_proj.weight", "q_a_bias": "q_a_proj.bias", "q_a_norm": "q_a_layernorm.weight", "q_b": "q_b_proj.weight",
    "kv_a": "kv_a_proj_with_mqa.weight", "kv_a_bias": "kv_a_proj_with_mqa.bias",
    "kv_a_norm": "kv_a_layernorm.weight", "kv_b": "kv_b_proj.weight",
}

RouteObserver = Callable[[int, torch.Tensor], None]  # (layer, topk_ids [T, k])


class _Layer:
    """One decoder layer's dense weights."""

    def __init__(self, model: "DenseModel", i: int, names: LayerNames):
        load = model.load
        attn = {role: load(f"{names.prefix}self_attn.{s}") for role, s in _ATTN.items()
                if f"{names.prefix}self_attn.{s}" in model.ckpt}
        need = ("q_a", "kv_a") if model.spec.attention.kind == "mla" else ("q", "k", "v", "o")
        for role in need:
            if role not in attn:
                raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks self_attn.{_ATTN[role]}")
        self.attn = Attention(model.spec.attention, i, attn, model.spec.rms_norm_eps)
        self.ln1 = load(f"{names.prefix}input_layernorm.weight")
        self.ln2 = load(f"{names.prefix}post_attention_layernorm.weight")
        self.sparse = names.block is not None
        self.dense = tuple(load(n) for n in names.dense) if names.dense else None
        if not self.sparse and self.dense is None:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} has neither experts nor a dense MLP")
        self.router = load(names.router).float() if names.router else None  # [E, H]
        self.router_bias = load(names.router_bias).float() if names.router_bias else None  # [E]
        self.shared = tuple(load(n) for n in names.shared) if names.shared else None
        self.shared_gate = load(names.shared_gate) if names.shared_gate else None  # [1, H]


class DenseModel:
    """Everything but the routed experts. `forward` runs one engine step; experts go through a Dispatcher."""

    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, names: WeightNames, dtype: torch.dtype,
                 device: torch.device, max_len: int):
        self.spec, self.ckpt, self.dtype, self.device = spec, ckpt, dtype, device
        root = names.root.rsplit("layers", 1)[0]  # "model."
        self.embed = self.load(f"{root}embed_tokens.weight")  # [V, H]
        self.norm = self.load(f"{root}norm.weight")
        head = "lm_head.weight"
        self.lm_head = self.load(head) if head in ckpt else self.embed  # tied embeddings
        self.layers = [_Layer(self, i, n) for i, n in enumerate(names.layers)]
        self.rotary = Rotary(spec, max_len, dtype, device)
        self.windows = set(spec.attention.sliding_window) or {None}
        self.route_observer: RouteObserver | None = None

    def load(self, name: str) -> torch.Tensor:
        return self.ckpt.read(name).to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, dispatcher: Dispatcher, all_tokens: bool = False
                ) -> torch.Tensor:
        """Run all layers for the step's T tokens.

        Returns final-normed hidden states [N, H] of each chunk's last token ([T, H] with all_tokens).
        """
        return self.forward_pipelined([batch], cache, dispatcher, all_tokens)[0]

    @torch.inference_mode()
    def forward_pipelined(self, batches: list[StepBatch], cache: KVCache, dispatcher: Dispatcher,
                          all_tokens: bool = False) -> list[torch.Tensor]:
        """Run micro-batches layer by layer, interleaved: while one micro-batch's experts run remotely,
        the next one's attention runs here. Same math per token as running each alone.

        Returns each batch's final-normed hidden states [N_b, H] (or [T_b, H] with all_tokens).
        """
        states = []
        for b in batches:
            cos, sin = self.rotary.tables(b.positions)
            states.append([self.embed[b.token_ids], b, (cos, sin, step_masks(b, self.windows))])  # h [T, H]
        for layer in self.layers:
            pending = [self._layer_pre(layer, st[0], st[1], cache, dispatcher, *st[2]) for st in states]
            for st, (h, x, p) in zip(states, pending):
                st[0] = self._layer_post(layer, h, x, p)
        eps = self.spec.rms_norm_eps
        return [rms_norm(h if all_tokens else h[b.last_rows], self.norm, eps) for h, b, _ in states]

    def _layer_pre(self, layer: _Layer, h: torch.Tensor, batch: StepBatch, cache: KVCache,
                   dispatcher: Dispatcher, cos, sin, masks):
        """Attention, norm, router and expert dispatch of one layer: h [T, H] -> (h, x, pending)."""
        eps = self.spec.rms_norm_eps
        h = h + layer.attn.forward(rms_norm(h, layer.ln1, eps), batch, cache, self.rotary, cos, sin, masks)
        x = rms_norm(h, layer.ln2, eps)
        if not layer.sparse:
            return h, x, None
        logits = F.linear(x.float(), layer.router)  # [T, E]
        topk_ids, topk_weights = route(logits, self.spec.moe, layer.router_bias)
        if self.route_observer is not None:
            self.route_observer(layer.attn.layer, topk_ids)
        return h, x, dispatcher.dispatch(layer.attn.layer, x, topk_ids, topk_weights)

    def _layer_post(self, layer: _Layer, h: torch.Tensor, x: torch.Tensor, pending) -> torch.Tensor:
        """Dense MLP, or shared experts (overlapping the remote experts) plus the routed experts' output."""
        if pending is None:
            return h + gated_mlp(x, *layer.dense)
        if layer.shared is not None:
            shared = gated_mlp(x, *layer.shared)
            if layer.shared_gate is not None:
                shared = torch.sigmoid(linear(x, layer.shared_gate)) * shared
            return h + (pending.wait() + shared)
        return h + pending.wait()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32."""
        return linear(hidden, self.lm_head).float()
