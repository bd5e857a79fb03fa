"""Mamba2 (state-space) layers, their conv window and scan state kept per KV-cache slot (DeltaState)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.linear_spec import Mamba2Spec

F32 = torch.float32
CHUNK = 64  # tokens per block of the chunked scan (any size gives the recurrence's result, to float32 rounding)


def _segments(a: torch.Tensor) -> torch.Tensor:
    """a [..., c] per-token log decays -> [..., c, c]: at (i, j) the sum of a over j+1..i (0 on the diagonal, -inf
    above it), summed from the masked terms rather than as a difference of running sums (no cancellation)."""
    c = a.shape[-1]
    terms = a[..., :, None].expand(*a.shape, c)  # [..., c, c]: a_i in row i
    below = torch.ones(c, c, dtype=torch.bool, device=a.device).tril(-1)
    seg = terms.masked_fill(~below, 0).cumsum(dim=-2)  # (i, j): a_{j+1} + ... + a_i where j < i
    return seg.masked_fill(~below.logical_or(torch.eye(c, dtype=torch.bool, device=a.device)), float("-inf"))


def chunked_scan(x, dt, a, b, c, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan over one sequence in blocks of CHUNK tokens (a last, shorter block as it is), float32:
    state_t = exp(dt_t a) state_{t-1} + dt_t x_t (x) B_t and y_t = C_t . state_t, each block's outputs and end
    state from its start state in a few matmuls. x [h, L, p], dt [h, L], a [h] (negative), b, c [h, L, n] (per
    head), state [h, p, n] or None (zeros) -> (y [h, L, p] without the D * x skip, final state [h, p, n])."""
    h, n_tok, p = x.shape
    s = x.new_zeros(h, p, b.shape[-1]) if state is None else state.to(F32)  # [h, p, n]
    whole, out = n_tok - n_tok % CHUNK, []
    for lo, hi in ((0, whole), (whole, n_tok)):  # the full blocks, then the rest as one shorter block
        if hi <= lo:
            continue
        size = min(CHUNK, hi - lo)
        xs, dts, bs, cs = (t[:, lo:hi].unflatten(1, (-1, size)) for t in (x, dt, b, c))  # [h, N, c, ...]
        steps = dts * a[:, None, None]  # [h, N, c] log decay of each token
        cum = steps.cumsum(dim=-1)  # [h, N, c] from the block's start, inclusive
        xdt = xs * dts[..., None]  # [h, N, c, p] what each token writes (times its B)
        within = (cs @ bs.transpose(-1, -2)) * _segments(steps).exp()  # [h, N, c, c] token i reads write j <= i
        y_in = within @ xdt  # [h, N, c, p]
        c_in = cs * cum.exp()[..., None]  # [h, N, c, n] reads of the start state
        writes = xdt.transpose(-1, -2) @ (bs * (cum[..., -1:] - cum).exp()[..., None])  # [h, N, p, n]
        end = cum[..., -1].exp()  # [h, N] the start state's decay over the block
        for i in range(xs.shape[1]):
            out.append(y_in[:, i] + c_in[:, i] @ s.transpose(-1, -2))  # [h, c, p]
            s = s * end[:, i, None, None] + writes[:, i]
    return torch.cat(out, dim=1), s


def scan_step(x, dt, a, b, c, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences, float32: x [B, h, p], dt [B, h], a [h], b, c [B, h, n], state
    [B, h, p, n] -> (y [B, h, p] without the D * x skip, new state)."""
    s = state * (dt * a).exp()[..., None, None] + (x * dt[..., None])[..., None] * b[:, :, None, :]
    return (s * c[:, :, None, :]).sum(dim=-1), s


class Mamba2:
    """One Mamba2 layer. Weights by role: in [2 inner + 2 groups d_state + heads, H] (rows z, x, B, C, dt), conv
    [conv_dim, 1, K], dt_bias, A_log and D [heads], norm [inner], out [H, inner]; conv_bias, in_bias, out_bias where
    the config builds them."""

    window = None  # no attention mask (DenseModel.windows)

    def __init__(self, spec: Mamba2Spec, layer: int, w: dict[str, torch.Tensor], eps: float):
        self.spec, self.layer, self.w, self.eps = spec, layer, w, eps
        self.neg_a = -w["A_log"].exp()  # [heads]: A = -exp(A_log), once at load (A_log, dt_bias, D: float32)
        self.dt_bias, self.d = w["dt_bias"], w["D"]  # [heads] each
        self.conv_w = w["conv"].float()  # [conv_dim, 1, K]: the conv sums in float32
        self.conv_b = w["conv_bias"].float() if "conv_bias" in w else None  # [conv_dim]

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None,
                picks=None) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' states in cache.linear[layer] (DeltaState)."""
        sp, t = self.spec, x.shape[0]
        z, xbc, dt = linear(x, self.w["in"], self.w.get("in_bias")).split([sp.inner, sp.conv_dim, sp.num_heads], -1)
        dt = F.softplus(dt.float() + self.dt_bias).clamp(*sp.dt_limit)  # [T, heads]
        state: DeltaState = cache.linear[self.layer]
        y = x.new_empty(t, sp.num_heads, sp.head_dim, dtype=F32)  # [T, heads, head_dim]
        for ch in batch.prefill:
            rows = slice(ch.offset, ch.offset + ch.length)
            read, write = state.copies(ch.slot, ch.start)
            window = state.conv[ch.slot, read][None] if read is not None else None  # [1, C, K-1]
            mixed, state.conv[ch.slot, write] = self._conv(xbc[rows].T[None], window)  # [1, C, L]
            xs, b, c = self._split(mixed[0].T.to(x.dtype))  # [L, heads, p], [L, heads, n] x2
            s0 = state.rec[ch.slot, read] if read is not None else None
            out, state.rec[ch.slot, write] = chunked_scan(xs.transpose(0, 1), dt[rows].T, self.neg_a,
                                                          b.transpose(0, 1), c.transpose(0, 1), s0)
            state.pos[ch.slot][write] = ch.start + ch.length
            y[rows] = out.transpose(0, 1) + self.d[:, None] * xs
        decode = [ch for ch in batch.chunks if ch.length == 1]
        if decode:
            self._decode(decode, xbc, dt, state, y, x.dtype)
        return self._output(y, z, x.dtype)

    def _decode(self, chunks, xbc, dt, state: DeltaState, y: torch.Tensor, dtype: torch.dtype) -> None:
        """The single-token chunks of the step, batched: one scan step each from its slot's state
        (DeltaState.decode_slots places them)."""
        ds = state.decode_slots(chunks)
        rows = ds.rows
        mixed, window = self._conv(xbc[rows][:, :, None], ds.read(state.conv))  # [B, C, 1], [B, C, K-1]
        ds.write(state.conv, window)
        xs, b, c = self._split(mixed[:, :, 0].to(dtype))  # [B, heads, p], [B, heads, n] x2
        out, s = scan_step(xs, dt[rows], self.neg_a, b, c, ds.read(state.rec))  # from [B, heads, p, n]
        ds.write(state.rec, s)
        state.advanced(ds)
        y[rows] = out + self.d[:, None] * xs

    def _conv(self, xbc: torch.Tensor, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv (+ bias) and SiLU of xbc [B, C, L] after the window [B, C, K-1] (None: zeros) ->
        (out [B, C, L] float32; the new window [B, C, K-1] in xbc's dtype, the last K-1 inputs as they came)."""
        kern = self.spec.conv_kernel
        if window is None:
            window = xbc.new_zeros(xbc.shape[0], xbc.shape[1], kern - 1)
        full = torch.cat((window.to(xbc.dtype), xbc), dim=-1)  # [B, C, K-1+L]
        out = F.silu(F.conv1d(full.float(), self.conv_w, self.conv_b, groups=xbc.shape[1]))  # [B, C, L]
        return out, full[..., full.shape[-1] - (kern - 1):]

    def _split(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixed [N, conv_dim] (rounded to the model's dtype, as transformers' conv returns it) -> x [N, heads,
        head_dim], B and C [N, heads, d_state] (each group's repeated over its heads), float32."""
        sp, n = self.spec, mixed.shape[0]
        xs, b, c = mixed.float().split([sp.inner, sp.n_groups * sp.d_state, sp.n_groups * sp.d_state], dim=-1)
        rep = sp.num_heads // sp.n_groups
        b, c = (t.reshape(n, sp.n_groups, sp.d_state).repeat_interleave(rep, dim=1) for t in (b, c))
        return xs.reshape(n, sp.num_heads, sp.head_dim), b, c

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gated RMSNorm (y * silu(z), normed per group of inner / n_groups channels and weighted in float32, rounded
        once to `dtype`) and out_proj. y [T, heads, head_dim] float32, z [T, inner] -> [T, H]."""
        sp, t = self.spec, y.shape[0]
        h = (y.reshape(t, sp.inner) * F.silu(z.float())).view(t, sp.n_groups, -1)  # [T, G, inner / G]
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).view(t, sp.inner)
        return linear((self.w["norm"].float() * h).to(dtype), self.w["out"], self.w.get("out_bias"))
