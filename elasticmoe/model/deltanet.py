"""Gated DeltaNet (linear-attention) layers and their per-slot recurrent state, as transformers runs Qwen3-Next."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch, to_device
from elasticmoe.model.linear_spec import DeltaNetSpec, ShortConvSpec

F32 = torch.float32
CHUNK = 64  # tokens per block of the chunked delta rule (transformers' torch fallback's chunk_size)


class DeltaState:
    """One per-slot-state layer's state per KV-cache slot: the conv window [slots, 2, C, K-1] (model dtype, as
    transformers keeps it) and, for Gated DeltaNet, the recurrent state [slots, 2, v_heads, k_dim, v_dim] (float32;
    None for LFM2's short convolutions, spec.rec_shape), each in two copies with the position they hold (`pos`). A
    step reads the copy at the position its chunk starts from and writes the other: a step repeated (the engine's
    retries, halves and pieces) reads the same state again. A chunk starting at 0 starts from zeros, whatever a
    slot's last request left."""

    def __init__(self, spec: DeltaNetSpec | ShortConvSpec, num_slots: int, dtype: torch.dtype, device: torch.device):
        self.conv = torch.zeros(num_slots, 2, spec.conv_dim, spec.conv_kernel - 1, dtype=dtype, device=device)
        shape = spec.rec_shape
        self.rec = None if shape is None else torch.zeros(num_slots, 2, *shape, dtype=F32, device=device)
        self.pos = [[-1, -1] for _ in range(num_slots)]

    def copies(self, slot: int, start: int) -> tuple[int | None, int]:
        """(the copy holding position `start`, None for zeros at 0; the copy to write)."""
        pos = self.pos[slot]
        if start == 0:
            pos[0] = pos[1] = -1
            return None, 0
        if start not in pos:
            raise RuntimeError(f"linear-attention state of KV-cache slot {slot} holds positions {pos}, not {start}")
        read = pos.index(start)
        return read, 1 - read

    def decode_slots(self, chunks) -> "DecodeSlots":
        """The single-token chunks' rows, slots and copies (each from copies()), gone to the device in one tensor: a
        copy from the host waits for the device's queued work (pinned, non-blocking on CUDA)."""
        copies = [self.copies(c.slot, c.start) for c in chunks]
        at = [-1 if r is None else r for r, _ in copies]  # the copy each reads (-1: none)
        index = to_device([c.offset for c in chunks] + [c.slot for c in chunks] + at + [w for _, w in copies],
                          self.conv.device).view(4, len(chunks))  # [4, B]
        return DecodeSlots(chunks, [w for _, w in copies], index[0], index[1], index[2].clamp(min=0), index[3],
                           index[2] < 0)

    def advanced(self, ds: "DecodeSlots") -> None:
        """The decoded chunks' written copies hold the position after their token (once their state is written)."""
        for c, w in zip(ds.chunks, ds.written):
            self.pos[c.slot][w] = c.start + 1

    def clear(self, slot: int) -> None:
        self.conv[slot].zero_()
        if self.rec is not None:
            self.rec[slot].zero_()
        self.pos[slot] = [-1, -1]

    def nbytes_per_slot(self) -> int:
        rec = 0 if self.rec is None else self.rec[0].numel() * self.rec.element_size()
        return self.conv[0].numel() * self.conv.element_size() + rec


@dataclass(frozen=True)
class DecodeSlots:
    """A step's single-token chunks as DeltaState.decode_slots places them: rows [B] of the step's tokens, slots [B],
    reads / writes [B] (the copies read and written), fresh [B] (a chunk at position 0: it reads zeros)."""

    chunks: list
    written: list[int]
    rows: torch.Tensor
    slots: torch.Tensor
    reads: torch.Tensor
    writes: torch.Tensor
    fresh: torch.Tensor

    def read(self, t: torch.Tensor) -> torch.Tensor:
        """The state each chunk starts from, t [slots, 2, ...] -> [B, ...] (zeros where fresh)."""
        return t[self.slots, self.reads].masked_fill(self.fresh.view(-1, *(1,) * (t.dim() - 2)), 0)

    def write(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """value [B, ...] into the copies each chunk writes in t [slots, 2, ...]."""
        t[self.slots, self.writes] = value


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _block_terms(q, k, v, g, beta) -> tuple[torch.Tensor, ...]:
    """What each block of c tokens computes without its starting state S0 (the gated delta rule unrolled: token i's
    write u_i = beta_i (v_i - k_i^T S_{i-1} decayed) = fresh_i - per_state_i @ S0, solved for the block at once).
    q, k [h, N, c, dk], v [h, N, c, dv], g, beta [h, N, c], float32 -> (fresh [h, N, c, dv], per_state [h, N, c, dk],
    within [h, N, c, c] the block's own reads, q_in [h, N, c, dk] reading S0, k_out [h, N, c, dk] writing the end
    state, end [h, N, 1, 1] S0's decay over the block)."""
    c = g.shape[-1]
    cum = g.cumsum(dim=-1)  # [h, N, c] log decay from the block's start to each token, inclusive
    later = torch.ones(c, c, dtype=torch.bool, device=g.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(later, float("-inf")).exp()  # [h, N, c, c] j <= i
    # token i's write reads the earlier writes j < i through k_i . k_j: a unit lower-triangular system per block
    # (the solve reads the strictly lower part; the diagonal is 1 whatever the matrix holds there)
    reads = (k @ k.transpose(-1, -2)) * decay * beta[..., None]  # [h, N, c, c]
    rhs = torch.cat((v, k * cum.exp()[..., None]), dim=-1) * beta[..., None]  # [h, N, c, dv + dk]
    solved = torch.linalg.solve_triangular(reads, rhs, upper=False, unitriangular=True)
    fresh, per_state = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    within = (q @ k.transpose(-1, -2)) * decay  # [h, N, c, c] token i reads writes j <= i
    k_out = k * (cum[..., -1:] - cum).exp()[..., None]
    return fresh, per_state, within, q * cum.exp()[..., None], k_out, cum[..., -1].exp()[..., None, None]


def chunked_rule(q, k, v, g, beta, state: torch.Tensor | None, terms=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over one sequence in blocks of CHUNK tokens (a last, shorter block as it is, unpadded):
    each block's terms in a few matmuls and one triangular solve, then the state passed block to block. All float32,
    q and k already normed and q scaled. q, k [h, L, dk], v [h, L, dv], g, beta [h, L], state [h, dk, dv] or None
    (zeros) -> (out [h, L, dv], final state [h, dk, dv]); recurrent_rule's result to float32 rounding. terms: the
    blocks' terms (default _block_terms; Kimi Delta Attention's per-channel gate g [h, L, dk]: kda.block_terms)."""
    terms_of = terms or _block_terms
    h, n, dk = k.shape
    whole = n - n % CHUNK
    s = q.new_zeros(h, dk, v.shape[-1]) if state is None else state.to(F32)  # [h, dk, dv]
    out = []
    for a, b in ((0, whole), (whole, n)):  # the full blocks, then the rest as one shorter block
        if b > a:
            c = min(CHUNK, b - a)
            terms = terms_of(*(x[:, a:b].unflatten(1, (-1, c)) for x in (q, k, v, g, beta)))  # [h, N, c, ...]
            for fresh, per_state, within, q_in, k_out, end in zip(*(t.unbind(1) for t in terms)):
                u = fresh - per_state @ s  # [h, c, dv] each token's write
                out.append(q_in @ s + within @ u)  # [h, c, dv]
                s = s * end + k_out.transpose(-1, -2) @ u  # end [h, 1, 1] (a per-channel gate's: [h, dk, 1])
    return torch.cat(out, dim=1), s


def recurrent_rule(q, k, v, g, beta, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked_rule's twin, token by token (the decode path's step): the reference it is tested and timed against.
    Same arguments and result."""
    s = q.new_zeros(k.shape[0], k.shape[2], v.shape[2]) if state is None else state.to(F32)  # [h, dk, dv]
    out = []
    for i in range(k.shape[1]):
        o, s = _recurrent_step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s)  # o [h, dv]
        out.append(o)
    return torch.stack(out, dim=1), s


def _recurrent_step(q, k, v, g, beta, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of each of B sequences (transformers' torch_recurrent_gated_delta_rule), float32.
    q, k [B, h, dk], v [B, h, dv], g, beta [B, h], state [B, h, dk, dv] -> (out [B, h, dv], new state). A
    per-channel gate (Kimi Delta Attention) g [B, h, dk] decays each key channel's row of the state."""
    s = state * (g.exp()[..., None, None] if g.dim() == beta.dim() else g.exp()[..., None])
    memory = (s * k[..., None]).sum(dim=-2)  # [B, h, dv]
    s = s + k[..., None] * ((v - memory) * beta[..., None])[..., None, :]
    return (s * q[..., None]).sum(dim=-2), s


class GatedDeltaNet:
    """One linear-attention layer. Weights by role: qkvz [2 key_dim + 2 value_dim, H] (rows q, k, v, z), ba
    [2 v_heads, H] (rows b, a), conv [C, 1, K], dt_bias and A_log [v_heads], norm [v_dim], out [H, value_dim]."""

    window = None  # no attention mask (DenseModel.windows)
    block_terms = None  # chunked_rule's default terms (a scalar gate per head)

    def __init__(self, spec: DeltaNetSpec, layer: int, w: dict[str, torch.Tensor], eps: float):
        self.spec, self.layer, self.w, self.eps = spec, layer, w, eps
        self.neg_decay = -w["A_log"].float().exp()  # [v_heads]: -exp(A_log), the log decay's rate, once at load
        self.conv_w = w["conv"].float()  # [C, 1, K]: the conv sums in float32

    def forward(self, x: torch.Tensor, batch: StepBatch, cache, rotary=None, cos=None, sin=None, masks=None, picks=None
                ) -> torch.Tensor:
        """x [T, H] -> [T, H]; reads and writes its slots' states in cache.linear[layer] (DeltaState)."""
        sp, t = self.spec, x.shape[0]
        qkv, z = linear(x, self.w["qkvz"]).split([sp.conv_dim, sp.value_dim], dim=-1)  # [T, C], [T, value_dim]
        b, a = linear(x, self.w["ba"]).chunk(2, dim=-1)  # [T, v_heads] each
        beta = b.sigmoid().float()
        g = self.neg_decay * F.softplus(a.float() + self.w["dt_bias"])  # [T, v_heads] log decay
        out = x.new_empty(t, sp.num_v_heads, sp.head_v_dim, dtype=F32)  # [T, v_heads, dv], normed before rounding
        self._run(batch, cache.linear[self.layer], qkv, g, beta, out)
        return self._output(out, z, x.dtype)

    def _run(self, batch: StepBatch, state: DeltaState, qkv, g, beta, out: torch.Tensor) -> None:
        """The step's chunks through the conv and the delta rule, each from its slot's state: qkv [T, C], g [T, h]
        (per channel: [T, h, dk]), beta [T, h] -> out [T, h, dv] float32; the states written to their other copy."""
        for c in batch.prefill:
            rows = slice(c.offset, c.offset + c.length)
            read, write = state.copies(c.slot, c.start)
            window = state.conv[c.slot, read][None] if read is not None else None
            mixed, state.conv[c.slot, write] = self._conv(qkv[rows].T[None], window)  # [1, C, L]
            q, k, v = (t.transpose(0, 1) for t in self._qkv(mixed[0].T))  # [h, L, d]
            s0 = state.rec[c.slot, read] if read is not None else None
            o, s = chunked_rule(q, k, v, g[rows].transpose(0, 1), beta[rows].T, s0, self.block_terms)
            state.rec[c.slot, write] = s
            state.pos[c.slot][write] = c.start + c.length
            out[rows] = o.transpose(0, 1)
        decode = [c for c in batch.chunks if c.length == 1]
        if decode:
            self._decode(decode, qkv, g, beta, state, out)

    def _decode(self, chunks, qkv, g, beta, state: DeltaState, out: torch.Tensor) -> None:
        """The single-token chunks of the step, batched: one recurrent step each from its slot's state.
        DeltaState.decode_slots places them."""
        ds = state.decode_slots(chunks)
        mixed, window = self._conv(qkv[ds.rows][:, :, None], ds.read(state.conv))  # [B, C, 1], [B, C, K-1]
        ds.write(state.conv, window)
        q, k, v = self._qkv(mixed[:, :, 0])  # [B, h, d]
        o, s = _recurrent_step(q, k, v, g[ds.rows], beta[ds.rows], ds.read(state.rec))  # from [B, h, dk, dv]
        ds.write(state.rec, s)
        state.advanced(ds)
        out[ds.rows] = o

    def _conv(self, mixed: torch.Tensor, window: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU of mixed [B, C, L] after the window [B, C, K-1] (None: zeros) -> (out
        [B, C, L] float32: summed and activated in float32, never rounded, as the delta rule reads it in float32;
        the new window [B, C, K-1] in mixed's dtype, the inputs as they came)."""
        kern = self.spec.conv_kernel
        if window is None:
            window = mixed.new_zeros(mixed.shape[0], mixed.shape[1], kern - 1)
        full = torch.cat((window.to(mixed.dtype), mixed), dim=-1)  # [B, C, K-1+L]
        y = F.silu(F.conv1d(full.float(), self.conv_w, groups=mixed.shape[1]))  # [B, C, L]
        return y, full[..., full.shape[-1] - (kern - 1):]

    def _qkv(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mixed [N, C] -> q, k [N, v_heads, dk] (l2-normed, q scaled by dk^-0.5, repeated per value head) and
        v [N, v_heads, dv], float32."""
        sp, n = self.spec, mixed.shape[0]
        q, k, v = mixed.split([sp.key_dim, sp.key_dim, sp.value_dim], dim=-1)
        rep = sp.num_v_heads // sp.num_k_heads
        q, k = (t.reshape(n, sp.num_k_heads, sp.head_k_dim).repeat_interleave(rep, dim=1).float() for t in (q, k))
        q = l2norm(q) * sp.head_k_dim**-0.5
        return q, l2norm(k), v.reshape(n, sp.num_v_heads, sp.head_v_dim).float()

    def _output(self, core: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gated RMSNorm (normed, weighted and gated by silu(z) in float32, rounded once to `dtype`) and out_proj.
        core [T, v_heads, dv] float32, z [T, value_dim] -> [T, H]."""
        t, h = core.shape[0], core
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = (self.w["norm"].float() * h * F.silu(z.reshape(core.shape).float())).to(dtype)
        return linear(h.reshape(t, -1), self.w["out"])


def flat_projections(w: dict[str, torch.Tensor], spec: DeltaNetSpec) -> dict[str, torch.Tensor]:
    """The layer's weights with its input projections as one [q ; k ; v ; z] and one [b ; a] matrix: Qwen3-Next's
    in_proj_qkvz / in_proj_ba interleave them per key head ([q k v z] of head 0, then head 1...), Qwen3.5's
    in_proj_qkv, in_proj_z, in_proj_b, in_proj_a are stored apart."""
    out = {r: t for r, t in w.items() if r not in ("qkvz", "ba", "qkv", "z", "b", "a")}
    nk, rep = spec.num_k_heads, spec.num_v_heads // spec.num_k_heads
    if "qkvz" in w:
        dk, dv = spec.head_k_dim, spec.head_v_dim
        parts = w["qkvz"].reshape(nk, 2 * dk + 2 * rep * dv, -1).split([dk, dk, rep * dv, rep * dv], dim=1)
        out["qkvz"] = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
        b, a = w["ba"].reshape(nk, 2 * rep, -1).split([rep, rep], dim=1)
        out["ba"] = torch.cat((b.reshape(-1, b.shape[-1]), a.reshape(-1, a.shape[-1])))
    else:
        out["qkvz"], out["ba"] = torch.cat((w["qkv"], w["z"])), torch.cat((w["b"], w["a"]))
    return out
