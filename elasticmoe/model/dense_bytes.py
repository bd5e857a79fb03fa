"""What the dense half (DenseModel) holds on its device, in bytes, from config.json and safetensors headers alone."""

from __future__ import annotations

import math

import torch

from elasticmoe.model.checkpoint import Checkpoint
from elasticmoe.model.dense_roles import F32_ATTN, F32_EXTRAS, NORMED_ATTN, own_attn
from elasticmoe.model.mla import Absorbed
from elasticmoe.model.names import LayerNames, WeightNames
from elasticmoe.model.spec import ModelSpec

F32 = torch.float32


def dense_bytes(spec: ModelSpec, ckpt: Checkpoint, names: WeightNames, dtype: torch.dtype, device: torch.device,
                max_len: int) -> int:
    """The bytes DenseModel(spec, ckpt, names, dtype, device, max_len) allocates on `device`: every dense weight it
    loads (each in the dtype it loads it in: the model's, or float32 for routers, zero-centred norms and scales), its
    float32 copies (a linear layer's conv and decay rates; MLA's kv_b where Absorbed keeps one: a half-precision
    model on CPU) and its rotary tables; a tied LM head once. Shapes from the headers: no weight is read. Left out:
    a few scalars (embed_scale, the placeholder ids)."""
    size = _sizer(spec, ckpt, dtype)
    total = sum(size(n) for n in (names.embed, names.norm_bias, names.lm_head, names.lm_head_bias) if n)
    total += size(names.norm, norm=True) + sum(size(n) for n in names.extras.values())
    kv_b_copy = dtype != F32 and Absorbed.keeps_float32_copy(device)
    total += sum(_layer_bytes(spec, ckpt, i, n, size, kv_b_copy) for i, n in enumerate(names.layers))
    return total + rotary_bytes(spec, max_len)


def rotary_bytes(spec: ModelSpec, max_len: int) -> int:
    """Rotary's cos and sin tables (layers.Rotary): per table [max_len, 2 * len(inv_freq)] float32 each."""
    return sum(2 * max_len * 2 * inv_freq.numel() * 4 for inv_freq, _ in spec.rope_tables)


def _sizer(spec: ModelSpec, ckpt: Checkpoint, dtype: torch.dtype):
    """size(name, load_dtype=None, norm=False): the bytes of tensor `name` loaded in load_dtype (default the model's;
    a norm: float32 where it is zero-centred, spec.norm_offset, else the model's)."""
    def size(name: str, load_dtype: torch.dtype | None = None, norm: bool = False) -> int:
        if norm and spec.norm_offset:
            load_dtype = F32
        return math.prod(ckpt.shape(name)) * (load_dtype or dtype).itemsize
    return size


def _layer_bytes(spec: ModelSpec, ckpt: Checkpoint, i: int, n: LayerNames, size, kv_b_copy: bool) -> int:
    """One decoder layer's share of dense_bytes."""
    if spec.linear is not None and spec.linear.layers[i]:
        unkept = getattr(spec.linear, "buffers", ())  # Lightning's buffers: read at load, none kept (f32_floats)
        only32 = getattr(spec.linear, "f32_only", ())  # Kimi-Linear: its convs held as one float32 conv alone
        f32 = (*getattr(spec.linear, "f32_roles", ()), *only32)  # and Mamba2's A_log, dt_bias, D in float32
        total = sum(size(name, F32 if role in f32 else None)
                    for role, name in n.linear.items() if role not in unkept)
        conv = n.linear.get("conv")  # absent: refused by name as DenseModel loads the layer (layer_weights)
        if conv and "conv" not in only32 and size(conv) != size(conv, F32):  # conv_w, its float32 copy
            total += size(conv, F32)
        conv_bias = n.linear.get("conv_bias")  # ShortConv: its float32 copy
        if conv_bias and size(conv_bias) != size(conv_bias, F32):
            total += size(conv_bias, F32)
        total += spec.linear.f32_floats * 4  # GatedDeltaNet: neg_decay [v_heads]; Mamba2: -exp(A_log); Lightning: slope
    else:
        attn = own_attn(spec, ckpt, i, n)
        total = sum(size(name, F32 if role in F32_ATTN else None, role in NORMED_ATTN) for role, name in attn.items())
        if kv_b_copy and spec.attention.layer(i).kind == "mla" and "kv_b" in attn:
            total += size(attn["kv_b"], F32)
    total += sum(size(name, norm=True) for name in n.norms.values())
    total += sum(size(name, F32 if role in F32_EXTRAS else None) for role, name in n.extras.items())
    total += sum(size(name) for mlp in (n.dense, n.shared) if mlp for name in mlp.values())
    return total + sum(size(name, F32) for name in (n.router, n.router_bias, n.router_logit_bias, n.shared_gate)
                       if name)
