"""Kimi Delta Attention (Kimi-Linear): Gated DeltaNet's per-slot machinery with a per-channel gate, as transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.deltanet import GatedDeltaNet, l2norm
from elasticmoe.model.kda_spec import CONVS, KDA_WEIGHTS, KDASpec

if TYPE_CHECKING:
    from elasticmoe.model.dense import DenseModel

F32 = torch.float32


def block_terms(q, k, v, g, beta) -> tuple[torch.Tensor, ...]:
    """deltanet._block_terms with a gate per key channel: g [h, N, c, dk] (log decays), the decay between tokens
    j <= i of a block exp(cum_i - cum_j) per channel, so each pair's k_i . k_j and q_i . k_j are weighted sums over
    the channels (formed block by block: [h, c, c, dk] at a time). q, k [h, N, c, dk], v [h, N, c, dv], beta
    [h, N, c], float32 -> (fresh [h, N, c, dv], per_state [h, N, c, dk], within [h, N, c, c], q_in [h, N, c, dk],
    k_out [h, N, c, dk], end [h, N, dk, 1] the state's rows' decay over the block)."""
    c = g.shape[-2]
    cum = g.cumsum(dim=-2)  # [h, N, c, dk] log decay from the block's start to each token, inclusive
    later = torch.ones(c, c, dtype=torch.bool, device=g.device).triu(1)[..., None]  # [c, c, 1] j > i
    reads, within = [], []
    for n in range(cum.shape[1]):
        cn, kn = cum[:, n], k[:, n]  # [h, c, dk]
        decay = (cn[:, :, None] - cn[:, None]).masked_fill(later, float("-inf")).exp()  # [h, c, c, dk] j <= i
        reads.append(torch.einsum("hid,hjd,hijd->hij", kn, kn, decay))
        within.append(torch.einsum("hid,hjd,hijd->hij", q[:, n], kn, decay))
    # token i's write reads the earlier writes j < i: a unit lower-triangular system per block (deltanet's)
    reads = torch.stack(reads, dim=1) * beta[..., None]  # [h, N, c, c]
    rhs = torch.cat((v, k * cum.exp()), dim=-1) * beta[..., None]  # [h, N, c, dv + dk]
    solved = torch.linalg.solve_triangular(reads, rhs, upper=False, unitriangular=True)
    fresh, per_state = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    k_out = k * (cum[..., -1:, :] - cum).exp()
    return fresh, per_state, torch.stack(within, dim=1), q * cum.exp(), k_out, cum[..., -1, :].exp()[..., None]


class KimiDeltaAttention(GatedDeltaNet):
    """One KDA layer (GatedDeltaNet's conv windows, two-copy states, prefill and decode paths). Weights by role: q, k,
    v [qkv, H]; conv [3 qkv, 1, K] (held float32 only; the hub's q_conv / k_conv / v_conv stacked); f_a [d, H], f_b
    [qkv, d], dt_bias [qkv], A_log [1, 1, heads, 1]; b [heads, H]; g_a [d, H], g_b [qkv, d]; o_norm [d]; o [H, qkv]
    (qkv = heads * d)."""

    block_terms = staticmethod(block_terms)

    def __init__(self, spec: KDASpec, layer: int, w: dict[str, torch.Tensor], eps: float):
        self.spec, self.layer, self.eps = spec, layer, eps
        convs = [w.pop(r) for r in ("conv", *CONVS) if r in w]
        self.conv_w = torch.cat([t.float() for t in convs]) if len(convs) > 1 else convs[0].float()  # [C, 1, K]
        self.w = w
        self.neg_decay = -w["A_log"].float().exp().reshape(spec.num_heads, 1)  # [heads, 1]: -exp(A_log), once

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None, picks=None
                ) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' states in cache.linear[layer] (DeltaState)."""
        sp, w, t = self.spec, self.w, x.shape[0]
        qkv = torch.cat([linear(x, w[r]) for r in ("q", "k", "v")], dim=-1)  # [T, 3 qkv]
        gate = linear(linear(x, w["f_a"]), w["f_b"]).float() + w["dt_bias"].float()  # [T, qkv]
        g = self.neg_decay * F.softplus(gate.view(t, sp.num_heads, sp.head_dim))  # [T, heads, d] log decays
        beta = linear(x, w["b"]).sigmoid().float()  # [T, heads]
        out = x.new_empty(t, sp.num_heads, sp.head_dim, dtype=F32)  # [T, heads, d], normed before rounding
        self._run(batch, cache.linear[self.layer], qkv, g, beta, out)
        return self._output(out, linear(linear(x, w["g_a"]), w["g_b"]), x.dtype)

    def _qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixed [N, 3 qkv] -> q, k [N, heads, d] (l2-normed in float32, q scaled by d^-0.5), v [N, heads, d]."""
        sp, n = self.spec, mixed.shape[0]
        q, k, v = (t.reshape(n, sp.num_heads, sp.head_dim).float() for t in mixed.chunk(3, dim=-1))
        return l2norm(q) * sp.head_dim**-0.5, l2norm(k), v

    def _output(self, core: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm of each head (float32, its weight in float32) times sigmoid(gate), rounded once to `dtype`, then
        o_proj. core [T, heads, d] float32, gate [T, qkv] -> [T, H]."""
        t, h = core.shape[0], core
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = (self.w["o_norm"].float() * h * gate.reshape(core.shape).float().sigmoid()).to(dtype)
        return linear(h.reshape(t, -1), self.w["o"])


def kda_layer(model: "DenseModel", i: int, names: dict[str, str]) -> KimiDeltaAttention:
    """Layer i's KDA from its self_attn.* weights (names: role -> tensor), shapes checked; the conv stacked
    (conv1d) or the hub's three (q_conv1d, k_conv1d, v_conv1d), not both."""
    sp, hidden = model.spec.linear, model.spec.hidden_size
    qkv, d, nh = sp.qkv_dim, sp.head_dim, sp.num_heads
    conv = (qkv, 1, sp.conv_kernel)
    shapes = {"q": (qkv, hidden), "k": (qkv, hidden), "v": (qkv, hidden), "conv": (3 * qkv, 1, sp.conv_kernel),
              "q_conv": conv, "k_conv": conv, "v_conv": conv, "f_a": (d, hidden), "f_b": (qkv, d), "dt_bias": (qkv,),
              "A_log": (1, 1, nh, 1), "b": (nh, hidden), "g_a": (d, hidden), "g_b": (qkv, d), "o_norm": (d,),
              "o": (hidden, qkv)}
    if "conv" in names and any(r in names for r in CONVS):
        raise CheckpointError(f"{model.ckpt.path}: layer {i} holds both self_attn.conv1d.weight and the separate "
                              "q_conv1d / k_conv1d / v_conv1d")
    convs = ("conv",) if "conv" in names else CONVS
    for role in (*(r for r in KDA_WEIGHTS if r != "conv" and r not in CONVS), *convs):
        if role not in names:
            name = KDA_WEIGHTS[role] if isinstance(KDA_WEIGHTS[role], str) else KDA_WEIGHTS[role][0]
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks self_attn.{name}")
    w = {r: model.load(n, shape=shapes[r]) for r, n in names.items()}
    return KimiDeltaAttention(sp, i, w, model.spec.rms_norm_eps)
