"""The dense half: embeddings, attention with a KV cache, norms, routers, shared experts, dense MLPs, LM head."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear

from elasticmoe.model.attention import KVCache, step_masks
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.dense_roles import F32_EXTRAS
from elasticmoe.model.dispatch import Dispatcher
from elasticmoe.model.extras import extra_shapes, normed_router_logits, ple_add, ple_inputs
from elasticmoe.model.layers import Rotary, act_fn, gated_mlp, norm, route
from elasticmoe.progress import LoadProgress
from elasticmoe.model.layer_weights import attention_layer, linear_layer
from elasticmoe.model.names import LayerNames, WeightNames
from elasticmoe.model.pipeline import ping_pong
from elasticmoe.model.spec import ModelSpec

RouteObserver = Callable[[int, torch.Tensor], None]  # (layer, topk_ids [T, k])


def mlp_shapes(ckpt: Checkpoint, names: dict[str, str], hidden: int) -> dict[str, tuple[int, ...]]:
    """The shapes a gated MLP's weights need: [I, H] gate and up (or [2I, H] gate_up) and [H, I] down."""
    inter = ckpt.shape(names["gate"])[0] if "gate" in names else ckpt.shape(names["gate_up"])[0] // 2
    return {"gate": (inter, hidden), "up": (inter, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


class _Layer:
    """One decoder layer's dense weights."""

    def __init__(self, model: "DenseModel", i: int, names: LayerNames):
        load, sp, hidden = model.load, model.spec, model.spec.hidden_size
        if sp.linear is not None and sp.linear.layers[i]:
            self.attn = linear_layer(model, i, names.linear)
        else:
            self.attn = attention_layer(model, i, names)
        self.norms = {role: model.load_norm(n, (hidden,)) for role, n in names.norms.items()}  # attn_in/out, mlp_in/..
        shapes = extra_shapes(sp)  # the scales in float32 (F32_EXTRAS); PLE's weights in the model's dtype
        self.extras = {r: load(n, torch.float32 if r in F32_EXTRAS else None, shapes[r])
                       for r, n in names.extras.items()}  # (model.extras)
        self.sparse = names.block is not None
        self.mlp_limit = sp.moe.shared_limits[i] if sp.moe.shared_limits else 0.0  # Step-3.7: its MLPs' SwiGLU clamp
        self.dense = model.load_mlp(names.dense) if names.dense else None
        if self.dense is None and (not self.sparse or sp.block == "shortcut" or sp.moe_beside_mlp):
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks its dense MLP")
        f32 = torch.float32  # the router as stored, not rounded to the model's dtype first
        ids = sp.moe.num_experts + sp.moe.zero_experts  # router rows (LongCat: its identity experts too)
        self.router = load(names.router, f32, (ids, hidden)) if names.router else None  # [E, H]
        self.router_bias = load(names.router_bias, f32, numel=ids).flatten() if names.router_bias else None  # [E]
        self.router_logit_bias = load(names.router_logit_bias, f32, (ids,)) if names.router_logit_bias else None
        self.shared = model.load_mlp(names.shared) if names.shared else None
        self.shared_gate = load(names.shared_gate, f32, (1, hidden)) if names.shared_gate else None  # [1, H]


class _PlusIdentity:
    """A dispatched expert output plus the identity experts' share computed in place (LongCat)."""

    def __init__(self, pending, identity: torch.Tensor):
        self.pending, self.identity = pending, identity

    def wait(self) -> torch.Tensor:
        return self.pending.wait() + self.identity


class _MicroBatch:
    """One micro-batch on its way through the layers: hidden states, and the expert call it has in flight."""

    def __init__(self, model: "DenseModel", batch: StepBatch):
        self.batch = batch
        cos, sin = model.rotary.tables(batch.positions)
        self.tables = (cos, sin, step_masks(batch, model.windows), {})  # {}: sparse attention's picks (Attention)
        ids = batch.token_ids  # [T]
        if model.placeholders is not None:  # a multimodal model's image / audio placeholders: the pad token on text
            ids = torch.where(torch.isin(ids, model.placeholders), model.spec.pad_token_id, ids)
        self.h = model.embed[ids]  # [T, H]
        if model.embed_scale is not None:
            self.h = self.h * model.embed_scale
        self.ple = None  # [T, L, P] per-layer inputs (model.extras)
        if model.spec.per_layer_input:
            self.ple = ple_inputs(model.extras, ids, self.h, len(model.layers), model.spec.rms_norm_eps,
                                  model.dtype)
        self.x: torch.Tensor | None = None  # [T, H] the MLP input of the layer in progress
        self.pending = None  # that layer's routed experts, in flight (None for a dense layer)
        self.carried = None  # LongCat: the previous layer's MoE output, added after this layer's MLP


class DenseModel:
    """Everything but the routed experts. `forward` runs one engine step; experts go through a Dispatcher."""

    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, names: WeightNames, dtype: torch.dtype,
                 device: torch.device, max_len: int):
        self.spec, self.ckpt, self.dtype, self.device = spec, ckpt, dtype, device
        with LoadProgress("loading the dense half", len(names.layers) + 1, lambda: ckpt.bytes_read,
                          equal_items=False) as progress:
            vocab, hidden = (spec.vocab_size, spec.hidden_size)
            self.embed = self.load(names.embed, shape=(vocab, hidden))  # [V, H]
            self.placeholders = (torch.tensor(spec.placeholder_ids, device=device)  # [P] ids embedded as pad
                                 if spec.placeholder_ids else None)
            # multiplies the embeddings; Gemma's rounded to the model's dtype first, as transformers (None: 1)
            self.embed_scale = None if spec.embed_scale == 1.0 else (
                torch.tensor(spec.embed_scale, dtype=dtype) if spec.embed_scale_rounded else spec.embed_scale)
            self.norm = self.load_norm(names.norm, (hidden,))
            self.norm_bias = self.load(names.norm_bias, shape=(hidden,)) if names.norm_bias else None
            self.lm_head = self.load(names.lm_head, shape=(vocab, hidden)) if names.lm_head else self.embed  # tied
            self.lm_head_bias = self.load(names.lm_head_bias, shape=(vocab,)) if names.lm_head_bias else None
            shapes = extra_shapes(spec)
            self.extras = {r: self.load(n, shape=shapes[r])
                           for r, n in names.extras.items()}  # PLE's table, projection and norm
            progress.step()
            self.layers = []
            for i, n in enumerate(names.layers):
                self.layers.append(_Layer(self, i, n))
                progress.step()
        self.rotary = Rotary(spec, max_len, dtype, device)
        self.windows = {layer.attn.window for layer in self.layers} or {None}  # mask keys (see step_masks)
        self.route_observer: RouteObserver | None = None

    def load(self, name: str, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None,
             numel: int | None = None) -> torch.Tensor:
        """One dense weight in `dtype` (default the model's); CheckpointError naming it when its stored shape is
        not `shape` (or it does not hold `numel` values): config.json fixes them."""
        got = self.ckpt.shape(name)
        if (shape is not None and got != tuple(shape)) or (numel is not None and math.prod(got) != numel):
            want = list(shape) if shape is not None else f"{numel} values"
            raise CheckpointError(f"{self.ckpt.file_of(name)}: {name!r} is {list(got)}, want {want} (as config.json "
                                  f"describes the model)")
        return self.ckpt.read_weight(name).to(device=self.device, dtype=dtype or self.dtype)

    def load_norm(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """A norm's weight; zero-centred norms (spec.norm_offset) as 1 + w in float32, as transformers applies it."""
        if not self.spec.norm_offset:
            return self.load(name, shape=shape)
        return self.load(name, torch.float32, shape) + self.spec.norm_offset

    def load_mlp(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        """A gated MLP's weights by role (gate/up/down or gate_up/down, biases unchecked), shapes checked."""
        shapes = mlp_shapes(self.ckpt, names, self.spec.hidden_size)
        return {r: self.load(n, shape=shapes.get(r)) for r, n in names.items()}

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
        """Run micro-batches as a ping-pong pipeline (pipeline.ping_pong): once its layer-l experts are back, a
        micro-batch runs post_l and pre_{l+1} while the other micro-batches' experts are in flight. Same math per
        token as running each micro-batch alone.

        Returns each batch's final-normed hidden states [N_b, H] (or [T_b, H] with all_tokens).
        """
        sp, last = self.spec, len(self.layers) - 1
        mbs = [_MicroBatch(self, b) for b in batches]
        for stage, i, m in ping_pong(len(self.layers), len(mbs)):
            mb, layer = mbs[m], self.layers[i]
            if stage == "pre":  # attention, router, dispatch
                mb.h, mb.x, mb.pending = self._layer_pre(layer, mb.h, mb.batch, cache, dispatcher, *mb.tables)
                continue
            pending = mb.pending
            if sp.block == "shortcut":  # LongCat: the MoE output joins after the next layer's MLP
                pending, mb.carried = mb.carried, pending
            mb.h = self._layer_post(layer, mb.h, mb.x, pending, mb.ple)  # shared experts, then the routed ones
            if i == last:
                h = mb.h if all_tokens else mb.h[mb.batch.last_rows]
                mb.h = norm(h, sp.norm, self.norm, self.norm_bias, sp.rms_norm_eps)
        return [mb.h for mb in mbs]

    def _norm(self, layer: _Layer, role: str, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The layer's `role` norm (attn_in, attn_out, mlp_in, mlp_out) of x, or x when the block has none;
        in out_dtype (default x's)."""
        w = layer.norms.get(role)
        if w is None:
            return x if out_dtype is None else x.to(out_dtype)
        eps = self.spec.layer_norm_eps or self.spec.rms_norm_eps  # JetMoE's layer norms: their own
        return norm(x, self.spec.norm, w, layer.norms.get(role + "_bias"), eps, out_dtype)

    def _layer_pre(self, layer: _Layer, h: torch.Tensor, batch: StepBatch, cache: KVCache,
                   dispatcher: Dispatcher, cos, sin, masks, picks=None):
        """Attention, norms, router and expert dispatch of one layer: h [T, H] -> (h, x, pending).

        Pre-norm h + attn(norm(h)); post-norm h + norm(attn(h)); sandwich both; parallel h + attn(x) + mlp(x).
        The residual stream h stays in float32 (returned float32), the router reads the float32 norm; attention
        and the experts get the norm rounded once to the model's dtype.
        """
        sp = self.spec
        h = h.float()  # [T, H]
        xf = self._norm(layer, "attn_in", h, torch.float32)  # [T, H]
        xa = xf.to(self.dtype)  # [T, H] the attention's input
        a = self._norm(layer, "attn_out", layer.attn.forward(xa, batch, cache, self.rotary, cos, sin, masks, picks),
                       torch.float32)
        h = self._residual(h, a, 2 * layer.attn.layer + 2, xa)
        if sp.block != "parallel":
            xf = self._norm(layer, "mlp_in", h, torch.float32)
        x = xf.to(self.dtype)  # [T, H]
        if not layer.sparse:
            return h, x, None
        if sp.router_norm:  # Gemma 4: the router reads the residual (model.extras)
            logits = normed_router_logits(h, layer.router, layer.extras["router_scale"], sp.rms_norm_eps)
        else:
            logits = F.linear(xf, layer.router, layer.router_logit_bias)  # [T, E]
        topk_ids, topk_weights = route(logits, sp.moe, layer.router_bias)
        if "expert_scale" in layer.extras:  # [E]: each expert's scale on its top-k weight
            topk_weights = topk_weights * layer.extras["expert_scale"][topk_ids]
        xe = self._norm(layer, "moe_in", h, self.dtype) if "moe_in" in layer.norms else x  # the experts' input
        identity = None
        if sp.moe.zero_experts:  # LongCat: ids >= num_experts are identity experts, computed here
            zero = topk_ids >= sp.moe.num_experts  # [T, k]
            identity = x * (topk_weights * zero).sum(-1, keepdim=True).to(x.dtype)  # [T, H]
            topk_ids = topk_ids.masked_fill(zero, -1)
        if self.route_observer is not None:
            ids = topk_ids[topk_ids >= 0].view(-1, 1) if identity is not None else topk_ids
            self.route_observer(layer.attn.layer, ids)
        pending = dispatcher.dispatch(layer.attn.layer, xe, topk_ids, topk_weights)
        return h, x, pending if identity is None else _PlusIdentity(pending, identity)

    def _layer_post(self, layer: _Layer, h: torch.Tensor, x: torch.Tensor, pending,
                    ple: torch.Tensor | None = None) -> torch.Tensor:
        """Dense MLP, or shared experts (overlapping the remote experts) plus the routed experts' output; then
        the layer's per-layer input (ple [T, L, P]) and scalar, where it has them."""
        act, lim = self.spec.mlp_act, layer.mlp_limit
        if self.spec.block == "shortcut":  # LongCat: this layer's MLP, plus the previous layer's MoE if carried
            out = gated_mlp(x, layer.dense, act) if pending is None else gated_mlp(x, layer.dense, act) + pending.wait()
        elif pending is None:
            out = gated_mlp(x, layer.dense, act, lim)
        elif self.spec.moe_beside_mlp:  # Gemma 4: the dense MLP and the experts, each normed, summed
            out = self._norm(layer, "dense_out", gated_mlp(x, layer.dense, act), torch.float32) \
                + self._norm(layer, "moe_out", pending.wait(), torch.float32)
        elif layer.shared is not None:
            shared = gated_mlp(x, layer.shared, act, lim).float()  # [T, H]
            if layer.shared_gate is not None:  # [1, H]: its dot products in float32
                shared = torch.sigmoid(F.linear(x.float(), layer.shared_gate)) * shared
            out = pending.wait().float() + shared
            if self.spec.moe.shared_combine == "average":
                out = out / 2
        else:
            out = pending.wait()
            out = out + layer.extras["moe_bias"] if "moe_bias" in layer.extras else out  # JetMoE's [H]
        out = self._norm(layer, "mlp_out", out)
        h = self._residual(h, out, 2 * layer.attn.layer + 3, x)
        if ple is not None:  # PLE: h + norm(proj(act(gate(h)) * this layer's input))
            h = ple_add(h, layer.extras, ple[:, layer.attn.layer], act_fn(act), self.spec.rms_norm_eps, self.dtype)
        return h * layer.extras["layer_scalar"] if "layer_scalar" in layer.extras else h

    def _residual(self, h: torch.Tensor, out: torch.Tensor, k: int, normed: torch.Tensor) -> torch.Tensor:
        """The k-th residual add (1-based; the embeddings are the first): h + out, out scaled by the residual
        multiplier; depth-scaled (Beam): h * sqrt((k - 1) / k) + out / sqrt(k); MiniMax: alpha * normed (the
        sublayer's input, in the model's dtype) + beta * out, by spec.residual_factors. h, out [T, H] -> [T, H]."""
        if self.spec.residual_factors:
            alpha, beta = self.spec.residual_factors[k // 2 - 1][2 * (k % 2):][:2]  # k even: attention; odd: MLP
            return normed.float() * alpha + out.float() * beta
        if self.spec.depth_scaled:
            return out * (1.0 / math.sqrt(k)) + h * math.sqrt((k - 1) / k)
        return h + out * self.spec.residual_scale if self.spec.residual_scale != 1.0 else h + out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V] float32."""
        out = linear(hidden.to(self.lm_head.dtype), self.lm_head, self.lm_head_bias).float()
        out = out * self.spec.logits_scale if self.spec.logits_scale != 1.0 else out
        cap = self.spec.logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap  # in float32, as transformers
