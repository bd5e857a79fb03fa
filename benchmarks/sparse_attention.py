"""DeepSeek sparse attention at decode: one MLA decode step's attention for a group of rows, gathering the picked
latents (O(topk) a row) against masking the unpicked keys of the whole context (O(L)); table + JSON.

Each row of the group attends its index_topk picks of L cached latents (DeepSeek-V3.2: topk 2048, kv_lora_rank
512, rope 64, nope and value heads 128) through `Attention.decode_group`, the engine's own decode read: gather
(positions [B, topk], what the indexer gives) and mask (the same picks as a keep mask [B, L]), in one run, with the
outputs' largest difference. The indexer's scoring of all L index keys (`indexer.top_keys`, the same for both,
reading them from the cache's blocks as the engine does) is timed beside them. --form: the decode read as the
engine runs it (absorbed: kv_b folded into the query, the latents attended as they are) or with every latent read
expanded through kv_b (expand; the read before decode absorbed kv_b, which the README's earlier figures measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from machine import write_result  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)

from elasticmoe.model.attention import Attention
from elasticmoe.model.batch import DecodeGroup
from elasticmoe.model.indexer import top_keys
from elasticmoe.model.kv_cache import KVCache
from elasticmoe.model.spec import AttentionSpec

OUT = Path(__file__).parent / "results" / "sparse_attention.json"


class LatentCache:
    """The part of a KVCache the decode read uses: layer 0's latent [rows, L, r + rope] (each row's L positions in
    one block of L), read as KVCache reads it."""

    read = staticmethod(KVCache.read)

    def __init__(self, latent: torch.Tensor):
        self.layers = [[latent]]


def timed(fn, repeats: int):
    """(fn()'s result from its first, untimed call, the median ms of `repeats` more)."""
    out, times = fn(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) * 1e3


def mla_attention(a) -> Attention:
    """Layer 0's MLA attention at a's head dims, kv_b random (scaled to keep its products near unit size)."""
    spec = AttentionSpec(kind="mla", num_heads=a.heads, num_kv_heads=a.heads, head_dim=a.nope + a.rope,
                         v_head_dim=a.v_head_dim, scaling=(a.nope + a.rope) ** -0.5, rope_dim=a.rope,
                         kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.nope)
    kv_b = torch.randn(a.heads * (a.nope + a.v_head_dim), a.kv_lora_rank) * a.kv_lora_rank**-0.5  # [h * (n + v), r]
    return Attention(spec, 0, {"kv_b": kv_b}, 1e-6)


def run_length(attn: Attention, a, length: int) -> dict:
    """One decode group of a.rows rows, each L = length tokens long: the picks, then both reads timed."""
    b = a.rows
    latent = torch.randn(b, length, a.kv_lora_rank + a.rope)  # [B, L, r + rope]
    g = DecodeGroup(rows=torch.arange(b), slots=torch.arange(b), lens=torch.full((b,), length), max_len=length,
                    read=torch.arange(b * length).view(b, length))  # [B, L]: row i's block is block i
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)  # [B, 1, 1, L]: every row's whole context
    iq, iw = torch.randn(b, a.index_heads, a.index_dim), torch.randn(b, a.index_heads)  # [B, h_ix, D], [B, h_ix]
    keys = torch.randn(b, length, a.index_dim)  # [B, L, D]: the index keys' cache, row i's block is block i
    valid = mask[:, 0, 0, :]
    picked, index_ms = timed(lambda: top_keys(iq, iw, keys, valid, a.topk, g.read), a.repeats)  # [B, topk]
    keep = torch.zeros(b, length, dtype=torch.bool).scatter_(1, picked, True)  # [B, L]
    q, cache = torch.randn(b, a.heads, a.nope + a.rope), LatentCache(latent)  # [B, h, d]
    with torch.no_grad():
        absorb = a.form == "absorbed"
        gathered, gather_ms = timed(lambda: attn.decode_group(q, g, mask, cache, picked, absorb), a.repeats)
        masked, mask_ms = timed(lambda: attn.decode_group(q, g, mask, cache, keep, absorb), a.repeats)
    return {"length": length, "topk": a.topk, "rows": b, "mask_ms": mask_ms, "gather_ms": gather_ms,
            "speedup": mask_ms / gather_ms, "indexer_ms": index_ms, "indexer_read": "paged spans",
            "max_abs_diff": float((gathered - masked).abs().max())}


def mla_arguments(doc: str, lengths: list[int], out: Path) -> argparse.ArgumentParser:
    """The MLA decode benchmarks' shared options: the contexts, the group, the layer's shapes, repeats, the JSON."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--lengths", type=int, nargs="+", default=lengths, help="context length L of every row")
    ap.add_argument("--rows", type=int, default=8, help="decode rows in the group")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-lora-rank", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64, help="qk_rope_head_dim")
    ap.add_argument("--nope", type=int, default=128, help="qk_nope_head_dim")
    ap.add_argument("--v-head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case (median), after one warm-up")
    ap.add_argument("--json", default=str(out))
    return ap


def run_lengths(a: argparse.Namespace, run_length) -> tuple[list[dict], tuple, tuple]:
    """One MLA layer built from `a` (seeded), run_length(attention, a, L) for each of a.lengths: (rows, the load
    average before, after)."""
    torch.manual_seed(0)
    attn, load_before = mla_attention(a), os.getloadavg()
    rows = [run_length(attn, a, n) for n in a.lengths]
    return rows, load_before, os.getloadavg()


def main() -> None:
    ap = mla_arguments(__doc__, [4096, 16384], OUT)
    ap.add_argument("--topk", type=int, default=2048, help="index_topk: keys each row attends")
    ap.add_argument("--index-heads", type=int, default=64, help="index_n_heads")
    ap.add_argument("--index-dim", type=int, default=128, help="index_head_dim")
    ap.add_argument("--form", choices=["absorbed", "expand"], default="absorbed",
                    help="the MLA decode read: kv_b absorbed (the engine's) or every read latent expanded")
    a = ap.parse_args()
    rows, load_before, load_after = run_lengths(a, run_length)
    print(f"\nMLA decode attention, {a.rows} rows, {a.heads} heads, kv_lora_rank {a.kv_lora_rank}, rope {a.rope}, "
          f"topk {a.topk}, {a.form}, fp32, {torch.get_num_threads()} threads, median of {a.repeats}; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'L':>7}{'mask ms':>10}{'gather ms':>11}{'speed-up':>10}{'indexer ms':>12}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['length']:>7}{r['mask_ms']:>10.1f}{r['gather_ms']:>11.1f}{r['speedup']:>9.2f}x"
              f"{r['indexer_ms']:>12.1f}{r['max_abs_diff']:>12.1e}")
    write_result(a.json, vars(a), {"threads": torch.get_num_threads(), "loadavg_before": load_before,
                                   "loadavg_after": load_after, "rows": rows})


if __name__ == "__main__":
    main()
