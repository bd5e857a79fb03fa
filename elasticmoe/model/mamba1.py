"""Mamba (v1) mixers (Jamba), their conv window and scan state kept per KV-cache slot (DeltaState)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.layers import act_fn
from elasticmoe.model.mamba1_spec import Mamba1Spec

F32 = torch.float32
BLOCK = 64  # tokens whose decays and writes [L, inner, d_state] are formed at once (bounds a long prompt's memory)


def scan(x, dt, a, b, c, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan over one sequence, float32, token by token: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t and
    y_t = C_t . h_t. x, dt [L, inner], a [inner, n] (negative), b, c [L, n], state [inner, n] or None (zeros) ->
    (y [L, inner] without the D * x skip, final state [inner, n])."""
    h = x.new_zeros(a.shape) if state is None else state.to(F32)  # [inner, n]
    out = []
    for lo in range(0, x.shape[0], BLOCK):
        hi = min(lo + BLOCK, x.shape[0])
        decay = (dt[lo:hi, :, None] * a).exp()  # [l, inner, n]
        write = (dt[lo:hi] * x[lo:hi])[:, :, None] * b[lo:hi, None, :]  # [l, inner, n]
        for t in range(hi - lo):
            h = decay[t] * h + write[t]
            out.append(h @ c[lo + t])  # [inner]
    return torch.stack(out), h


def scan_step(x, dt, a, b, c, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences, float32: x, dt [B, inner], a [inner, n], b, c [B, n], state [B, inner, n]
    -> (y [B, inner] without the D * x skip, new state)."""
    h = state * (dt[..., None] * a).exp() + (dt * x)[..., None] * b[:, None, :]
    return (h * c[:, None, :]).sum(dim=-1), h


class Mamba1:
    """One Mamba (v1) layer (Jamba's). Weights by role: in [2 inner, H] (rows x, z), conv [inner, 1, K], x_proj
    [dt_rank + 2 d_state, inner], dt_proj [inner, dt_rank] and its bias, A_log [inner, d_state] and D [inner]
    (float32), dt_norm / b_norm / c_norm, out [H, inner]; conv_bias, in_bias, out_bias where the config builds them."""

    window = None  # no attention mask (DenseModel.windows)

    def __init__(self, spec: Mamba1Spec, layer: int, w: dict[str, torch.Tensor], eps: float):
        self.spec, self.layer, self.w, self.eps = spec, layer, w, eps
        self.neg_a = -w["A_log"].exp()  # [inner, d_state]: A = -exp(A_log), once at load
        self.conv_w = w["conv"].float()  # [inner, 1, K]: the conv sums in float32
        self.conv_b = w["conv_bias"].float() if "conv_bias" in w else None  # [inner]
        self.act = act_fn(spec.act)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None,
                picks=None) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' states in cache.linear[layer] (DeltaState)."""
        sp, t = self.spec, x.shape[0]
        xs, z = linear(x, self.w["in"], self.w.get("in_bias")).split([sp.inner, sp.inner], -1)  # [T, inner] x2
        state: DeltaState = cache.linear[self.layer]
        y = x.new_empty(t, sp.inner, dtype=F32)  # [T, inner]
        for ch in batch.prefill:
            rows = slice(ch.offset, ch.offset + ch.length)
            read, write = state.copies(ch.slot, ch.start)
            window = state.conv[ch.slot, read][None] if read is not None else None  # [1, inner, K-1]
            mixed, state.conv[ch.slot, write] = self._conv(xs[rows].T[None], window)  # [1, inner, L]
            u = mixed[0].T.to(x.dtype)  # [L, inner]
            dt, b, c = self._params(u)
            s0 = state.rec[ch.slot, read] if read is not None else None
            out, state.rec[ch.slot, write] = scan(u.float(), dt, self.neg_a, b, c, s0)
            state.pos[ch.slot][write] = ch.start + ch.length
            y[rows] = out + self.w["D"] * u.float()
        decode = [ch for ch in batch.chunks if ch.length == 1]
        if decode:
            self._decode(decode, xs, state, y, x.dtype)
        out = (y * F.silu(z.float())).to(x.dtype)  # [T, inner]
        return linear(out, self.w["out"], self.w.get("out_bias"))

    def _decode(self, chunks, xs, state: DeltaState, y: torch.Tensor, dtype: torch.dtype) -> None:
        """The single-token chunks of the step, batched: one scan step each from its slot's state
        (DeltaState.decode_slots places them)."""
        ds = state.decode_slots(chunks)
        mixed, window = self._conv(xs[ds.rows][:, :, None], ds.read(state.conv))  # [B, inner, 1], [B, inner, K-1]
        ds.write(state.conv, window)
        u = mixed[:, :, 0].to(dtype)  # [B, inner]
        dt, b, c = self._params(u)
        out, s = scan_step(u.float(), dt, self.neg_a, b, c, ds.read(state.rec))  # from [B, inner, d_state]
        ds.write(state.rec, s)
        state.advanced(ds)
        y[ds.rows] = out + self.w["D"] * u.float()

    def _conv(self, x: torch.Tensor, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv (+ bias) and the activation of x [B, C, L] after the window [B, C, K-1] (None:
        zeros) -> (out [B, C, L] float32; the new window [B, C, K-1] in x's dtype, the last K-1 inputs)."""
        kern = self.spec.conv_kernel
        if window is None:
            window = x.new_zeros(x.shape[0], x.shape[1], kern - 1)
        full = torch.cat((window.to(x.dtype), x), dim=-1)  # [B, C, K-1+L]
        out = self.act(F.conv1d(full.float(), self.conv_w, self.conv_b, groups=x.shape[1]))  # [B, C, L]
        return out, full[..., full.shape[-1] - (kern - 1):]

    def _params(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u [N, inner] (the conv's output in the model's dtype) -> dt [N, inner], B and C [N, d_state], float32:
        x_proj, the RMSNorms of dt, B and C (normed in float32, rounded, then weighted), dt_proj, its bias (in the
        model's dtype, as transformers adds it) and softplus."""
        sp = self.spec
        dt, b, c = linear(u, self.w["x_proj"]).split([sp.dt_rank, sp.d_state, sp.d_state], dim=-1)
        dt, b, c = (self._norm(v, self.w[r]) for v, r in ((dt, "dt_norm"), (b, "b_norm"), (c, "c_norm")))
        dt = linear(dt, self.w["dt_proj"]) + self.w["dt_proj_bias"].to(u.dtype)  # [N, inner]
        return F.softplus(dt).float(), b.float(), c.float()

    def _norm(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        vf = v.float()
        return weight * (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + self.eps)).to(v.dtype)
