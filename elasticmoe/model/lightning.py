"""MiniMax's lightning (linear) attention layers, their recurrent state kept per KV-cache slot (DeltaState)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.deltanet import DeltaState
from elasticmoe.model.layers import act_fn
from elasticmoe.model.lightning_spec import LightningSpec

if TYPE_CHECKING:
    from elasticmoe.model.dense import DenseModel

F32 = torch.float32
NORM_EPS = 1e-6  # the output RMSNorm's (transformers builds it with its default eps, not config.rms_norm_eps)
DECAY_TOL = 1e-2  # a stored decay buffer may differ this much from what its slope_rate makes (half-precision storage)


def blockwise(q, k, v, slope: torch.Tensor, block: int, spec: LightningSpec, state: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention over one sequence in blocks of `block` tokens (the last one shorter), as transformers'
    prefill: within a block ((q k^T) * decay) v, across blocks q's decay times the state, the state decayed over the
    block plus its decayed k^T v. q, k, v [h, L, d], slope [h, 1, 1] float32, state [h, d, d] or None (zeros) ->
    (out [h, L, d], the state after the last token)."""
    h, n, d = k.shape
    s = q.new_zeros(h, d, d) if state is None else state  # [h, d, d]
    whole = n - n % block
    out = []
    for a, b in ((0, whole), (whole, n)):  # the full blocks, then the rest as one shorter block
        if b <= a:
            continue
        c = min(block, b - a)
        q_decay, k_decay, diagonal = spec.decays(slope, c)  # [h, c, 1], [h, c, 1], [1, h, c, c]
        qb, kb, vb = (x[:, a:b].unflatten(1, (-1, c)).transpose(0, 1) for x in (q, k, v))  # [N, h, c, d]
        within = ((qb @ kb.transpose(-1, -2)) * diagonal[0]) @ vb  # [N, h, c, d]
        writes = (kb * k_decay).transpose(-1, -2) @ vb  # [N, h, d, d]
        qb, end = qb * q_decay, torch.exp(-slope * c)  # end [h, 1, 1]: the state's decay over a block
        for i in range(qb.shape[0]):
            out.append(within[i] + qb[i] @ s)  # [h, c, d]
            s = s * end + writes[i]
    return torch.cat(out, dim=1), s


def recurrent(q, k, v, slope: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences (transformers' decode): the state decayed by exp(-slope) plus k^T v, read by
    q. q, k, v [B, h, d], slope [h, 1, 1], state [B, h, d, d] float32 -> (out [B, h, d], new state)."""
    s = state * torch.exp(-slope) + k[..., :, None] * v[..., None, :]  # [B, h, d, d]
    return (q[..., None, :] @ s)[..., 0, :], s


class Lightning:
    """One lightning attention layer. Weights by role: qkv [3 h d, H] (rows q, k, v per head, interleaved), gate
    [h d, H], norm [h d], out [H, h d]; `slope` [h] float32 (stored slope_rate, or spec.slopes)."""

    window = None  # no attention mask (DenseModel.windows)

    def __init__(self, spec: LightningSpec, layer: int, w: dict[str, torch.Tensor], slope: torch.Tensor):
        self.spec, self.layer, self.w = spec, layer, w
        self.slope = slope.view(-1, 1, 1)  # [h, 1, 1]
        self.act = act_fn(spec.act)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None,
                picks=None) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' states in cache.linear[layer] (DeltaState)."""
        sp, t = self.spec, x.shape[0]
        qkv = self.act(linear(x, self.w["qkv"])).reshape(t, sp.num_heads, 3, sp.head_dim).float()  # [T, h, 3, d]
        q, k, v = qkv.unbind(2)  # [T, h, d] each
        state: DeltaState = cache.linear[self.layer]
        out = x.new_empty(t, sp.num_heads, sp.head_dim, dtype=F32)  # [T, h, d]
        for c in batch.prefill:
            rows = slice(c.offset, c.offset + c.length)
            read, write = state.copies(c.slot, c.start)
            s0 = state.rec[c.slot, read] if read is not None else None
            o, state.rec[c.slot, write] = blockwise(*(y[rows].transpose(0, 1) for y in (q, k, v)), self.slope,
                                                    sp.block_size, sp, s0)
            state.pos[c.slot][write] = c.start + c.length
            out[rows] = o.transpose(0, 1)
        decode = [c for c in batch.chunks if c.length == 1]
        if decode:
            self._decode(decode, q, k, v, state, out)
        return self._output(out, x)

    def _decode(self, chunks, q, k, v, state: DeltaState, out: torch.Tensor) -> None:
        """The single-token chunks of the step, batched: one recurrent step each from its slot's state (zeros at
        position 0). DeltaState.decode_slots places them."""
        ds = state.decode_slots(chunks)
        rows = ds.rows
        o, s = recurrent(q[rows], k[rows], v[rows], self.slope, ds.read(state.rec))  # from [B, h, d, d]
        ds.write(state.rec, s)
        state.advanced(ds)
        out[rows] = o

    def _output(self, core: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm of the heads' outputs together (in float32, rounded to x's dtype, then weighted), times
        sigmoid(output_gate(x)), out_proj. core [T, h, d] float32, x [T, H] -> [T, H]."""
        flat = core.reshape(core.shape[0], -1)  # [T, h d]
        normed = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + NORM_EPS)).to(x.dtype) * self.w["norm"]
        return linear(torch.sigmoid(linear(x, self.w["gate"])) * normed, self.w["out"])


def lightning_layer(model: "DenseModel", i: int, names: dict[str, str]) -> Lightning:
    """Layer i's lightning attention from its self_attn.* weights (names: role -> tensor), shapes checked. A
    stored slope_rate is used (transformers loads it); stored decay buffers, which transformers' prefill reads,
    must be what that slope and config.block_size make."""
    sp, hidden = model.spec.linear, model.spec.hidden_size
    shapes = {"qkv": (3 * sp.inner, hidden), "gate": (sp.inner, hidden), "norm": (sp.inner,),
              "out": (hidden, sp.inner)}
    for role in shapes:
        if role not in names:
            raise CheckpointError(f"{model.ckpt.path}: layer {i} lacks {sp.weights[role]}")
    w = {r: model.load(names[r], shape=s) for r, s in shapes.items()}
    h, b = sp.num_heads, sp.block_size
    slope = (model.load(names["slope"], F32, (h, 1, 1)) if "slope" in names
             else sp.slopes(i).to(model.device).view(h, 1, 1))  # [h, 1, 1]
    want = dict(zip(("query_decay", "key_decay", "diagonal_decay"), sp.decays(slope, b)))
    for role, derived in want.items():
        if role in names:
            stored = model.load(names[role], F32, tuple(derived.shape))
            if float((stored - derived).abs().max()) > DECAY_TOL:
                raise CheckpointError(f"{model.ckpt.file_of(names[role])}: {names[role]!r} is not the decay that "
                                      f"the layer's slope_rate and config.block_size={b} make (transformers' prefill "
                                      "and decode would disagree)")
    return Lightning(sp, i, w, slope.flatten().clone())
