"""Expert math beside fused_moe: each layer's activation (kernels.act.ExpertAct) and GPT-OSS's (MXFP4) weights."""

from __future__ import annotations

import torch

from elasticmoe.kernels import ExpertAct
from elasticmoe.model.checkpoint import Checkpoint, CheckpointError
from elasticmoe.model.expert_names import ExpertRef
from elasticmoe.model.quant import dequant_mxfp4
from elasticmoe.model.spec import MoESpec


def _packed(ckpt: Checkpoint, name: str, scales: str | None, index: int) -> torch.Tensor:
    """One expert's row of a packed tensor, as [out, in]: MXFP4 (stored [out, in/32, 16]) or plain ([in, out])."""
    t = ckpt.read(name, index=index)
    if scales is not None:
        s = ckpt.read(scales, index=index)
        for part, x in ((name, t), (scales, s)):
            if x.dtype != torch.uint8:  # bytes: a signed or wider reading gives other codes and exponents
                raise CheckpointError(f"{ckpt.file_of(part)}: MXFP4 {part!r} is {x.dtype}, want uint8 (U8)")
        return dequant_mxfp4(t, s)
    if t.dim() != 2 or not t.is_floating_point():
        raise CheckpointError(f"{ckpt.path}: {name!r} holds {t.dtype} {list(t.shape)} rows and no scales beside it")
    return t.t()


def read_swiglu_expert(ckpt: Checkpoint, ref: ExpertRef, hidden: int, inter: int) -> tuple[torch.Tensor, ...]:
    """GPT-OSS expert `ref.index`: w13 [2I, H] (gate rows, then up rows), w2 [H, I], b13 [2I], b2 [H].

    On disk gate and up are interleaved (even rows gate, odd rows up); they are split here once.
    """
    if ref.gate_up is None:
        raise CheckpointError(f"{ckpt.path}: GPT-OSS experts must be packed (experts.gate_up_proj), not {ref.gate}")
    if ref.gate_up_bias is None or ref.down_bias is None:
        raise CheckpointError(f"{ckpt.path}: {ref.gate_up} has no gate_up_proj_bias / down_proj_bias beside it")
    gate_up = _packed(ckpt, ref.gate_up, ref.gate_up_scales, ref.index)  # [2I, H], interleaved
    w2 = _packed(ckpt, ref.down, ref.down_scales, ref.index)  # [H, I]
    b13 = ckpt.read_weight(ref.gate_up_bias, index=ref.index)  # [2I], interleaved
    b2 = ckpt.read_weight(ref.down_bias, index=ref.index)  # [H]
    for name, t, want in ((ref.gate_up, gate_up, (2 * inter, hidden)), (ref.down, w2, (hidden, inter)),
                          (ref.gate_up_bias, b13, (2 * inter,)), (ref.down_bias, b2, (hidden,))):
        if tuple(t.shape) != want:
            raise CheckpointError(f"{ckpt.path}: {name!r} gives expert {ref.index} a {list(t.shape)} weight, "
                                  f"want {list(want)} (hidden {hidden}, intermediate {inter})")
    w13 = torch.cat((gate_up[0::2], gate_up[1::2]), dim=0)
    return w13, w2, torch.cat((b13[0::2], b13[1::2])), b2


def expert_act(moe: MoESpec, layer: int) -> ExpertAct:
    """The routed experts' activation at `layer` for fused_moe: GPT-OSS's clamped SwiGLU (swiglu_limit, swiglu_alpha),
    Gemma 4's gated tanh-GELU, or gated SiLU, clamped where Step-3.7's swiglu_limits give the layer a limit; Llama 4's
    routing weights scale the experts' inputs (input_scaled)."""
    if moe.expert_act == "swiglu_clamped":
        return ExpertAct("swiglu_oai", moe.swiglu_limit, moe.swiglu_alpha, moe.input_scaled)
    limit = moe.swiglu_limits[layer] if moe.swiglu_limits else 0.0
    return ExpertAct(moe.expert_act, float(limit), input_scaled=moe.input_scaled)
