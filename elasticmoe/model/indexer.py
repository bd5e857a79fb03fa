"""DeepSeek sparse attention (DSA): the lightning indexer that picks, per query, the cached keys it attends to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elasticmoe.kernels.cpu_gemm import maybe_linear as linear
from elasticmoe.model.batch import StepBatch
from elasticmoe.model.indexer_spec import IndexerSpec
from elasticmoe.model.layers import Rotary, layer_norm

F32 = torch.float32
SCORE_BUDGET = 1 << 24  # floats of [rows, heads, keys] scores held at once (64 MiB): queries scored in blocks
ROLES = ("index_q", "index_k", "index_norm", "index_norm_b", "index_weights")  # names.ATTN; weights in float32


def index_shapes(ix: IndexerSpec, hidden: int, q_lora_rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes config.json fixes for the indexer's weights, by role (names.ATTN)."""
    return {"index_q": (ix.n_heads * ix.head_dim, q_lora_rank), "index_k": (ix.head_dim, hidden),
            "index_norm": (ix.head_dim,), "index_norm_b": (ix.head_dim,), "index_weights": (ix.n_heads, hidden)}


def top_keys(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, topk: int) -> torch.Tensor:
    """Each query's `topk` best keys among its valid ones, as transformers picks them: positions [N, min(topk, L)]
    int64 (a query with fewer valid keys gets all of them, the rest of its row invalid positions).

    score[n, l] = sum_h w[n, h] * relu(q[n, h] . keys[l] / sqrt(D)). q [N, h, D], w [N, h] float32,
    keys [N or 1, L, D], valid [N, L] bool.
    """
    n, h, d = q.shape
    length = keys.shape[1]
    k = min(topk, length)
    out = torch.empty(n, k, dtype=torch.int64, device=q.device)
    rows = max(1, SCORE_BUDGET // max(1, h * length))
    for a in range(0, n, rows):
        b = min(n, a + rows)
        kk = keys if keys.shape[0] == 1 else keys[a:b]
        scores = F.relu(torch.matmul(q[a:b], kk.float().transpose(1, 2)) * d**-0.5)  # [n, h, L]
        index = torch.matmul(w[a:b, None, :], scores)[:, 0]  # [n, L]
        out[a:b] = index.masked_fill(~valid[a:b], float("-inf")).topk(k, dim=-1).indices
    return out


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
            out.append(top_keys(q[g.rows], hw[g.rows], cache.read(store, g.read), valid, ix.topk))  # [B, topk]
        return out
