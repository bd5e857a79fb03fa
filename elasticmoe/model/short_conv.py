"""LFM2's short-convolution layers, their conv window kept per KV-cache slot (DeltaState), as transformers runs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.linear_spec import ShortConvSpec


class ShortConv:
    """One short-convolution layer. Weights by role: in [3H, H] (rows B, C, x), conv [H, 1, K], out [H, H], and
    in_bias, conv_bias, out_bias where config.conv_bias builds them."""

    window = None  # no attention mask (DenseModel.windows)

    def __init__(self, spec: ShortConvSpec, layer: int, w: dict[str, torch.Tensor]):
        self.spec, self.layer, self.w = spec, layer, w
        self.conv_w = w["conv"].float()  # [H, 1, K]: the conv sums in float32
        self.conv_b = w["conv_bias"].float() if "conv_bias" in w else None  # [H]

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None,
                picks=None) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' conv windows in cache.linear[layer] (DeltaState)."""
        b, c, v = linear(x, self.w["in"], self.w.get("in_bias")).chunk(3, dim=-1)  # [T, H] each
        bx = b * v  # [T, H]: what the conv reads (and its window keeps)
        state: DeltaState = cache.linear[self.layer]
        y = torch.empty_like(bx)  # [T, H]
        for ch in batch.prefill:
            rows = slice(ch.offset, ch.offset + ch.length)
            read, write = state.copies(ch.slot, ch.start)
            window = state.conv[ch.slot, read][None] if read is not None else None  # [1, H, K-1]
            out, state.conv[ch.slot, write] = self._conv(bx[rows].T[None], window)  # [1, H, L]
            state.pos[ch.slot][write] = ch.start + ch.length
            y[rows] = out[0].T
        decode = [ch for ch in batch.chunks if ch.length == 1]
        if decode:
            self._decode(decode, bx, state, y)
        return linear(c * y, self.w["out"], self.w.get("out_bias"))

    def _decode(self, chunks, bx: torch.Tensor, state: DeltaState, y: torch.Tensor) -> None:
        """The single-token chunks of the step, batched, each from its slot's window (DeltaState.decode_slots places
        them)."""
        ds = state.decode_slots(chunks)
        out, window = self._conv(bx[ds.rows][:, :, None], ds.read(state.conv))  # [B, H, 1], [B, H, K-1]
        ds.write(state.conv, window)
        state.advanced(ds)
        y[ds.rows] = out[:, :, 0]

    def _conv(self, bx: torch.Tensor, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of bx [B, H, L] after the window [B, H, K-1] (None: zeros) -> (out [B, H, L] in
        bx's dtype, summed in float32; the new window [B, H, K-1], the last K-1 inputs as they came)."""
        kern = self.spec.conv_kernel
        if window is None:
            window = bx.new_zeros(bx.shape[0], bx.shape[1], kern - 1)
        full = torch.cat((window.to(bx.dtype), bx), dim=-1)  # [B, H, K-1+L]
        out = F.conv1d(full.float(), self.conv_w, self.conv_b, groups=bx.shape[1])  # [B, H, L]
        return out.to(bx.dtype), full[..., full.shape[-1] - (kern - 1):]
