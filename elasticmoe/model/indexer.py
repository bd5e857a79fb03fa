"""DeepSeek sparse attention (DSA): the lightning indexer that picks, per query, the cached keys it attends to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.indexer_spec import IndexerSpec
from elasticmoe.model.kv_cache import KVCache
from elasticmoe.model.layers import Rotary, layer_norm

F32 = torch.float32
# floats of [rows, keys, heads] products held at once on CPU (8 MiB): each op is a parallel region whose threads
# wait on each other, so fewer, larger ones; A/B against the whole-product scoring at 8 rows of 64 heads, on a
# 2-CPU machine at load 4-5: 1.0-1.4x (L 4096) and 4.0x (16,384) on one thread, 1.3x and 1.5x on two, where a
# 2 MiB block ran 0.7-0.8x on two threads
SCORE_BLOCK = 1 << 21
DEVICE_SCORE_BLOCK = 1 << 24  # on an accelerator (64 MiB): few, large products; launches, not caches, cost there
MIN_KEYS = 256  # keys a block scores at least (fewer queries a block when they have many heads)
ROLES = ("index_q", "index_k", "index_norm", "index_norm_b", "index_weights")  # names.ATTN; weights in float32


def index_shapes(ix: IndexerSpec, hidden: int, q_lora_rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes config.json fixes for the indexer's weights, by role (names.ATTN)."""
    return {"index_q": (ix.n_heads * ix.head_dim, q_lora_rank), "index_k": (ix.head_dim, hidden),
            "index_norm": (ix.head_dim,), "index_norm_b": (ix.head_dim,), "index_weights": (ix.n_heads, hidden)}


def top_keys(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, topk: int,
             index: torch.Tensor | None = None) -> torch.Tensor:
    """Each query's `topk` best keys among its valid ones, as transformers picks them: positions [N, min(topk, L)]
    int64 (a query with fewer valid keys gets all of them, the rest of its row invalid positions).

    score[n, l] = sum_h w[n, h] * relu(q[n, h] . keys[l] / sqrt(D)) (`scores`). q [N, h, D], w [N, h] float32,
    keys [N or 1, L, D] any float dtype, valid [N, L] bool; with index [N or 1, L]: keys is a paged cache tensor
    [blocks, block_size, D] read at those flat rows (KVCache.read), a block of keys at a time.
    """
    n, h, _ = q.shape
    k = min(topk, valid.shape[1])
    out = torch.empty(n, k, dtype=torch.int64, device=q.device)
    rows = max(1, min(n, _block(q) // (h * MIN_KEYS)))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        s = scores(q[a:b], w[a:b], _rows(keys, a, b) if index is None else keys,
                   None if index is None else _rows(index, a, b))  # [n, L]
        out[a:b] = s.masked_fill_(~valid[a:b], float("-inf")).topk(k, dim=-1).indices
    return out


def _block(q: torch.Tensor) -> int:
    """Floats of products a block of the scoring holds, on q's device."""
    return SCORE_BLOCK if q.device.type == "cpu" else DEVICE_SCORE_BLOCK


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of t [N or 1, ...] (all of it when its one row is shared by every query)."""
    return t if t.shape[0] == 1 else t[a:b]


def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """The indexer's scores [N, L] float32: sum_h w[n, h] * relu(q[n, h] . k[l] / sqrt(D)), the 1 / sqrt(D) folded
    into w (relu(x s) = s relu(x), s > 0). Keys go in spans whose [N, span, h] products stay in cache (relu and the
    weighted head sum done there), each span converted to float32 (or read from the paged cache, index) alone, so no
    [N, h, L] product and no float32 copy of all L keys is made. q [N, h, D], w [N, h]; keys and index as top_keys'.
    """
    n, h, d = q.shape
    length = (keys if index is None else index).shape[1]
    shared = (keys if index is None else index).shape[0] == 1 and n > 1  # one key set for every query (prefill)
    ws = (w.to(F32) * d**-0.5)[:, :, None]  # [N, h, 1]
    qt = q.to(F32).reshape(n * h, d).t() if shared else q.to(F32).transpose(1, 2)  # [D, N h] or [N, D, h]
    out = torch.empty(n, length, 1, dtype=F32, device=q.device)
    span = max(MIN_KEYS, _block(q) // (n * h))
    for a in range(0, length, span):
        b = min(length, a + span)
        kk = (keys[:, a:b] if index is None else KVCache.read(keys, index[:, a:b])).to(F32)  # [N or 1, span, D]
        s = torch.mm(kk[0], qt).view(b - a, n, h).transpose(0, 1) if shared else torch.bmm(kk, qt)  # [N, span, h]
        torch.bmm(s.relu_(), ws, out=out[:, a:b])
    return out[..., 0]


def pick(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, topk: int) -> torch.Tensor:
    """top_keys as a mask: keep [N, L] bool (picked and valid)."""
    keep = torch.zeros(valid.shape, dtype=torch.bool, device=q.device)
    return keep.scatter_(1, top_keys(q, w, keys, valid, topk), True) & valid


class Indexer:
    """One layer's indexer: its keys go into the KV cache (KVCache.index_keys), its queries pick the keys each query
    of the step attends to, per prefill chunk (a mask [t, start + t]) and per decode group (positions [B, topk])."""

    def __init__(self, spec: IndexerSpec, layer: int, w: dict[str, torch.Tensor]):
        self.spec, self.layer, self.w = spec, layer, w

    def picks(self, x: torch.Tensor, q_resid: torch.Tensor, batch: StepBatch, cache, rotary: Rotary,
              cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor | None]:
        """x [T, H] (the attention's input), q_resid [T, q_lora_rank] -> the picks: per prefill chunk a keep mask
        [t, start + t] (True = attended), then per decode group the positions [B, topk] each row attends (a
        row's positions at or past its length are padding: the attention masks them), None where every key is kept
        (no more than topk of them). Writes this step's index keys to the cache."""
        ix, w = self.spec, self.w
        t = x.shape[0]
        k = layer_norm(linear(x, w["index_k"]), w["index_norm"], w["index_norm_b"], ix.eps, F32)  # [T, D]
        k = rotary.apply(k[:, None, :], cos, sin, ix.rope_interleave)[:, 0]
        store = cache.index_keys(self.layer)  # [blocks, block_size, D]
        cache.write(store, batch.write_index, k)
        q = linear(q_resid, w["index_q"]).view(t, ix.n_heads, ix.head_dim)
        q = rotary.apply(q, cos, sin, ix.rope_interleave)  # [T, h, D] float32
        hw = F.linear(x.to(F32), w["index_weights"]) * ix.n_heads**-0.5  # [T, h]
        out: list[torch.Tensor | None] = []
        for c, index in zip(batch.prefill, batch.prefill_reads):  # index [1, L]
            if c.start + c.length <= ix.topk:
                out.append(None)
                continue
            rows = slice(c.offset, c.offset + c.length)
            qpos = torch.arange(c.start, c.start + c.length, device=x.device)[:, None]
            causal = torch.arange(c.start + c.length, device=x.device)[None, :] <= qpos  # [t, L]
            out.append(pick(q[rows], hw[rows], cache.read(store, index), causal, ix.topk))
        for g in batch.decode_groups:
            if g.max_len <= ix.topk:
                out.append(None)
                continue
            valid = torch.arange(g.max_len, device=x.device)[None, :] < g.lens[:, None]  # [B, L]
            out.append(top_keys(q[g.rows], hw[g.rows], store, valid, ix.topk, g.read))  # [B, topk], no copy of L keys
        return out
