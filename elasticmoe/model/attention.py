"""Attention over a paged KV cache: grouped-query attention and DeepSeek's multi-head latent attention."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import DecodeGroup, StepBatch
from elasticmoe.model.indexer import Indexer
from elasticmoe.model.kv_cache import KVCache  # noqa: F401  (re-exported: the engine's and tests' import)
from elasticmoe.model.layers import Rotary, rms_norm
from elasticmoe.model.mla import Absorbed
from elasticmoe.model.spec import AttentionSpec

F32 = torch.float32


def step_masks(batch: StepBatch, windows: set[int | None]) -> list[dict[int | None, torch.Tensor]]:
    """Per decode group (batch.decode_groups), boolean masks [B, 1, 1, L] (True = attend), one per sliding-window
    size; L is the group's longest context."""
    out = []
    for g in batch.decode_groups:
        cols = torch.arange(g.max_len, device=g.lens.device)[None, :]  # [1, L]
        lens = g.lens[:, None]  # [B, 1]
        masks = {}
        for w in windows:
            m = cols < lens
            if isinstance(w, tuple):  # ("chunk", c): keys in the query's chunk of c positions (Llama 4)
                m = m & (cols >= (lens - 1) // w[1] * w[1])
            elif w is not None:
                m = m & (cols >= lens - w)
            masks[w] = m[:, None, None, :]
        out.append(masks)
    return out


def _prefill_mask(start: int, length: int, window: int | tuple | None, device: torch.device) -> torch.Tensor | None:
    """[length, start+length] causal (optionally windowed) mask; None when plain causal SDPA will do."""
    if start == 0 and window is None:
        return None
    q = torch.arange(start, start + length, device=device)[:, None]
    k = torch.arange(start + length, device=device)[None, :]
    m = k <= q
    if isinstance(window, tuple):  # ("chunk", c)
        m = m & (k // window[1] == q // window[1])
    elif window is not None:
        m = m & (k > q - window)
    return m


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, h, Tq, d], k [B, hk, Tk, d], v [B, hk, Tk, dv] -> [B, h, Tq, dv].

    GQA: a single query row per sequence (decode) folds the heads sharing a KV head into the query axis,
    [B, hk, rep, d], so no expanded copy of the cache is made; longer queries expand k and v.
    """
    b, h, tq, _ = q.shape
    if k.shape[1] != h and tq == 1 and not causal:
        qg = q.reshape(b, k.shape[1], h // k.shape[1], q.shape[3])  # [B, hk, rep, d]
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # [B, hk, rep, dv]
        return o.reshape(b, h, 1, v.shape[3])
    if k.shape[1] != h:
        rep = h // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)


def _attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, causal: bool,
                       sinks: torch.Tensor) -> torch.Tensor:
    """GPT-OSS attention: one extra logit per head (its sink) joins each softmax and is dropped after it.

    q [B, h, Tq, d], k [B, hk, Tk, d], v [B, hk, Tk, dv], sinks [h], mask [.., Tq, Tk] bool or None -> [B, h, Tq, dv].
    """
    b, h, tq, _ = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    logits = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, h, Tq, Tk]
    if mask is None and causal:
        mask = torch.ones(tq, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - tq)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    sink = sinks.to(logits.dtype).view(1, h, 1, 1).expand(b, h, tq, 1)
    combined = torch.cat((logits, sink), dim=-1)  # [B, h, Tq, Tk + 1]
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = combined.softmax(dim=-1)[..., :-1]  # the sink's share is dropped
    return torch.matmul(probs.to(v.dtype), v)


def _position_scale(positions: torch.Tensor, period: float, beta: float) -> torch.Tensor:
    """1 + beta * log(1 + floor(positions / period)): queries scaled up with the position. positions [T] -> [T]."""
    return torch.log1p(torch.floor(positions.float() / period)) * beta + 1.0


class Attention:
    """One layer's attention weights and forward. Weights: a dict of tensors by role (q, k, v, o, norms...)."""

    def __init__(self, spec: AttentionSpec, layer: int, w: dict[str, torch.Tensor], eps: float):
        self.source = spec.source(layer)  # the layer whose cached keys / values it attends (itself unless shared)
        self.v_from_k = bool(spec.v_from_k and spec.v_from_k[layer])  # values = the raw keys (no v_proj)
        spec = spec.layer(layer)  # its own heads and head dim where they differ per layer
        self.spec, self.layer, self.w, self.eps = spec, layer, w, eps
        self.rope_set = spec.rope_sets[layer] if spec.rope_sets else 0  # its rotary table (per layer type)
        ix = spec.indexer
        self.indexer = Indexer(ix, layer, w) if ix and ix.own[layer] else None  # None on a layer sharing picks
        self.window = spec.sliding_window[layer] if spec.sliding_window else None  # mask key, see step_masks
        if spec.chunk and spec.chunk[layer]:
            self.window = ("chunk", spec.chunk[layer])
        self.rope = spec.rope_layers[layer] if spec.rope_layers else True  # False: a NoPE layer
        self.absorbed = None  # MLA: kv_b split for decode's absorbed form (mla.Absorbed), once, here
        if spec.kind == "mla":
            self.absorbed = Absorbed.of(w["kv_b"], spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim)

    def forward(self, x: torch.Tensor, batch: StepBatch, cache: KVCache, rotary: Rotary,
                cos: torch.Tensor, sin: torch.Tensor, masks: list[dict], picks: dict | None = None) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes this step's keys/values into the cache. cos / sin: every rotary table's
        (Rotary.tables), this layer's picked by rope_set. Sparse attention: `picks` (one per micro-batch) carries the
        last indexer's picks (indexer.Indexer.picks) to the layers that share them: a decode group's positions
        [B, k] are gathered (only the picked latents read, O(topk) a row), a keep mask [B, L] masks all L. MLA
        decode groups attend the cached latents with kv_b absorbed (decode_group); prefill chunks expand them (many
        queries a key: the expansion is shared)."""
        cos, sin, gate, keep = cos[self.rope_set], sin[self.rope_set], None, None
        if self.spec.kind == "mla":
            q, kv_new, q_resid = self._mla_qkv(x, rotary, cos, sin)
            if self.indexer is not None:
                picks["keep"] = self.indexer.picks(x, q_resid, batch, cache, rotary, cos, sin)
            keep = picks["keep"] if self.spec.indexer else None  # [t, L] per prefill chunk, then [B, k] per group
            if self.spec.query_scale:  # Mistral 4
                q = (q * _position_scale(batch.positions, *self.spec.query_scale)[:, None, None]).to(q.dtype)
            cache.write(cache.layers[self.layer][0], batch.write_index, kv_new)
        else:
            q, k, v, gate = self._gqa_qkv(x, rotary, cos, sin, batch.positions)  # q, k float32; the cache rounds k
            if k is not None:  # else a layer sharing another's cache (KV sharing), written by that layer
                kc, vc = cache.layers[self.layer]
                cache.write(kc, batch.write_index, k)
                cache.write(vc, batch.write_index, v)
        out = self.attend(q, x.dtype, batch, cache, masks, keep)  # [T, h, dv]
        if gate is not None or "gate" in self.w:
            out = self._gated(out, x, gate)
        out = out.reshape(x.shape[0], -1)  # [T, h * dv]
        return linear(out, self.w["o"], self.w.get("o_bias"))

    def attend(self, q: torch.Tensor, dtype: torch.dtype, batch: StepBatch, cache: KVCache, masks: list[dict],
               keep=None) -> torch.Tensor:
        """Queries q [T, h, d] over the cached keys and values (this step's written already): each prefill chunk
        causally (windowed), each decode group by its masks; sparse attention's `keep` per chunk / group ->
        [T, h, dv] in dtype."""
        q = q.float()  # scores, softmax and the weighted sum of values in float32, rounded once into out
        out = torch.empty(q.shape[0], self.spec.num_heads, self.spec.v_head_dim, dtype=dtype, device=q.device)
        expand, attend = self._readers()
        for i, c in enumerate(batch.prefill):
            kk, vv = (t.float() for t in expand(cache, batch.prefill_reads[i]))  # [1, hk, L, d], L = start + length
            qq = q[c.offset : c.offset + c.length].transpose(0, 1)[None]  # [1, h, t, d]
            mask = _prefill_mask(c.start, c.length, self.window, q.device)
            if keep is not None and keep[i] is not None:  # the picked keys, causal already
                mask = keep[i] if mask is None else mask & keep[i]
            o = attend(qq, kk, vv, mask, self.spec.scaling, causal=True)
            out[c.offset : c.offset + c.length] = o[0].transpose(0, 1)
        for j, (g, m) in enumerate(zip(batch.decode_groups, masks)):  # rows of similar contexts: padded to the longest
            picked = None if keep is None else keep[len(batch.prefill) + j]
            out[g.rows] = self.decode_group(q[g.rows], g, m[self.window], cache, picked).to(out.dtype)
        return out

    def _readers(self):
        """(expand, attend): the cache reader of this layer's kind and the attention (GPT-OSS: with sinks)."""
        expand = self._mla_expand if self.spec.kind == "mla" else self._gqa_gather
        return expand, partial(_attend_with_sinks, sinks=self.w["sinks"]) if "sinks" in self.w else _sdpa

    def decode_group(self, q: torch.Tensor, g: DecodeGroup, mask: torch.Tensor, cache: KVCache,
                     picked: torch.Tensor | None = None, absorb: bool = True) -> torch.Tensor:
        """One decode group's attention: q [B, h, d] float32, mask [B, 1, 1, L] (the rows' lengths and window) ->
        [B, h, dv] float32; the rows' cached positions are read at g.read (their flat cache rows [B, L]). Sparse
        attention's `picked`: positions [B, k] (indexer.Indexer.picks; only those keys are read: O(topk) a row, not
        O(L)), a keep mask [B, L] (every key read, the unpicked masked), or None (every key kept). MLA attends the
        cached latents themselves, kv_b absorbed into the query and the output (mla.Absorbed); absorb=False expands
        each latent read through kv_b instead, as prefill chunks do (the twin the tests hold it to)."""
        index = g.read
        if picked is not None and picked.dtype != torch.bool:
            index = g.read.gather(1, picked)  # [B, k]: the picked positions' rows
            mask = mask.gather(3, picked[:, None, None, :])  # a padding row's picks past its length: masked
        elif picked is not None:
            mask = mask & picked[:, None, None, :]
        if self.absorbed is not None and absorb:
            lat = self._mla_latents(cache, index).float()  # [B, n, r + rope]
            return self.absorbed.attend(q, lat, mask, self.spec.scaling, self.w.get("sinks"))
        expand, attend = self._readers()
        kk, vv = expand(cache, index)  # [B, hk, n, d]
        o = attend(q[:, :, None, :], kk.float(), vv.float(), mask, self.spec.scaling, causal=False)  # [B, h, 1, dv]
        return o[:, :, 0, :]

    def _gated(self, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """The attention output [T, h, dv] times a gate: `gate` (Qwen3-Next: the gate half of q_proj) or one of x
        [T, H] (self_attn.<gate_name>); sigmoid per feature (Qwen3-Next, AFMoE), softplus (in float32, rounded to
        the output's dtype) per head or per feature (Laguna); Beam's adds one bias per head."""
        g = linear(x, self.w["gate"]) if gate is None else gate  # [T, h] per head, [T, h * dv] per feature
        if "gate_offset" in self.w:  # Beam: self_attn.gate_bias [h], over each head's values
            g = (g.view(out.shape[0], out.shape[1], -1) + self.w["gate_offset"][:, None]).flatten(1)
        g = torch.sigmoid(g) if self.spec.out_gate == "sigmoid" else F.softplus(g.float()).to(out.dtype)
        if self.spec.gate_per_head:
            return out * g[:, :, None]
        return (out.reshape(x.shape[0], -1) * g).view(out.shape)

    def _gqa_qkv(self, x, rotary, cos, sin, positions):
        """x [T, H] -> q [T, h, d] float32, this step's k [T, hk, d] and v [T, hk, dv] (None on a layer sharing
        another's cache: queries only), and the output gate [T, h * d] (Qwen3-Next) or None."""
        a, w, t = self.spec, self.w, x.shape[0]
        q, gate = linear(x, w["q"], w.get("q_bias")), None
        if a.output_gate:  # per head [q ; gate]
            q, gate = q.view(t, a.num_heads, 2 * a.head_dim).chunk(2, dim=-1)
            q, gate = q.reshape(t, -1), gate.reshape(t, -1)
        k = v = None
        if self.source == self.layer:
            k = linear(x, w["k"], w.get("k_bias"))
            v = k if self.v_from_k else linear(x, w["v"], w.get("v_bias"))  # attention_k_eq_v: the raw keys

        def each(f, q, k):  # f(z, "q" / "k") on q, and on k where this layer has keys
            return f(q, "q"), (None if k is None else f(k, "k"))

        if a.clip_qkv is not None:  # DBRX
            q, k = each(lambda z, _: z.clamp(min=-a.clip_qkv, max=a.clip_qkv), q, k)
            v = None if v is None else v.clamp(min=-a.clip_qkv, max=a.clip_qkv)
        if v is not None:
            v = v.view(t, a.num_kv_heads, a.v_head_dim)
            v = rms_norm(v, 1.0, self.eps, F32) if a.v_norm else v  # Gemma 4: a weightless norm per value head
            v = v * a.v_scale if a.v_scale != 1.0 else v  # MiMo-V2-Flash: attention_value_scale, in the model dtype
        if "q_norm" in w and w["q_norm"].shape[0] != a.head_dim:  # OLMoE: norm over all heads
            q, k = each(lambda z, r: rms_norm(z, w[r + "_norm"], self.eps, F32), q, k)
        q, k = each(lambda z, r: z.view(t, a.num_heads if r == "q" else a.num_kv_heads, a.head_dim), q, k)
        if "q_norm" in w and w["q_norm"].shape[0] == a.head_dim:  # Qwen3: per-head norm
            q, k = each(lambda z, r: rms_norm(z, w[r + "_norm"], self.eps, F32), q, k)
        if self.rope:
            q, k = each(lambda z, _: rotary.apply(z, cos, sin), q, k)
        if "q_norm_rope" in w:  # HunYuan: per-head norm after the rotary
            q, k = each(lambda z, r: rms_norm(z, w[r + "_norm_rope"], self.eps, F32), q, k)
        if a.l2_qk_norm and self.rope:  # Llama 4: weightless per-head norm after the rotary, rotary layers only
            q, k = each(lambda z, _: rms_norm(z, 1.0, self.eps, F32), q, k)
        if a.nope_query_scale and not self.rope:  # Beam NoPE layers: q * (1 + (pos + 1) / p) ** e, in float32
            p, e = a.nope_query_scale
            q = q.float() * torch.exp(e * torch.log1p((positions.float() + 1) / p))[:, None, None]
        if a.temperature and not self.rope:  # Llama 4 NoPE layers: queries scaled up with the position
            q = (q * _position_scale(positions + 1, *a.temperature)[:, None, None]).to(q.dtype)
        return q, k, v, gate

    def _gqa_gather(self, cache: KVCache, index: torch.Tensor):
        """The cached keys and values at flat rows index [B, L] (StepBatch.prefill_reads, DecodeGroup.read):
        [B, hk, L, d] and [B, hk, L, dv]."""
        kc, vc = cache.layers[self.layer]
        return cache.read(kc, index).transpose(1, 2), cache.read(vc, index).transpose(1, 2)

    def _mla_qkv(self, x, rotary, cos, sin):
        a, w, t = self.spec, self.w, x.shape[0]
        q_resid = None  # [T, q_lora_rank]: the normed query bottleneck (the sparse-attention indexer reads it too)
        if "q_a" in w:
            q_resid = rms_norm(linear(x, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], self.eps)
            q = linear(q_resid, w["q_b"])
        else:
            q = linear(x, w["q"])
        q = q.view(t, a.num_heads, a.head_dim)
        if a.q_scale != 1.0:  # LongCat
            q = q * a.q_scale
        q_pass, q_rot = q.split([a.qk_nope_head_dim, a.rope_dim], dim=-1)
        ckv = linear(x, w["kv_a"], w.get("kv_a_bias"))  # [T, r + rope]
        kv_nope, k_rot = ckv.split([a.kv_lora_rank, a.rope_dim], dim=-1)
        kv_nope = rms_norm(kv_nope, w["kv_a_norm"], self.eps, F32)  # rounded once, into the cache
        if a.kv_scale != 1.0:  # LongCat
            kv_nope = kv_nope * a.kv_scale
        if self.rope:
            q_rot = rotary.apply(q_rot, cos, sin)
            k_rot = rotary.apply(k_rot[:, None, :], cos, sin)[:, 0]
        return torch.cat((q_pass, q_rot), dim=-1), torch.cat((kv_nope, k_rot), dim=-1), q_resid

    def _mla_latents(self, cache: KVCache, index: torch.Tensor) -> torch.Tensor:
        """The cached latents at flat rows index [B, n] (a prefill chunk's or a decode group's positions, or a
        group's picks): [B, n, r + rope], the normed kv latent then the rotated key."""
        return cache.read(cache.layers[self.layer][0], index)

    def _mla_expand(self, cache: KVCache, index: torch.Tensor):
        """The cached latents at flat rows index [B, n], expanded through kv_b: k and v [B, h, n, d]."""
        return self._mla_kv(self._mla_latents(cache, index))

    def _mla_kv(self, lat: torch.Tensor):
        """Latents [B, n, r + rope] through kv_b: k [B, h, n, nope + rope], v [B, h, n, dv]."""
        a = self.spec
        b, n = lat.shape[0], lat.shape[1]
        kv = linear(lat[..., : a.kv_lora_rank], self.w["kv_b"]).view(b, n, a.num_heads, -1)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k_rot = lat[..., a.kv_lora_rank :][:, :, None, :].expand(b, n, a.num_heads, a.rope_dim)
        k = torch.cat((k_nope, k_rot), dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)
