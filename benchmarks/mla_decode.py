"""MLA decode: one decode group's attention with kv_b absorbed into the query and the output (attending the cached
latents themselves) against expanding every latent through kv_b first; table + JSON.

A group of rows of L cached latents each (DeepSeek-V3's head dims: kv_lora_rank 512, rope 64, nope and value heads
128) through `Attention.decode_group`, the engine's own decode read, both ways in one run (absorb=True, what decode
runs, and absorb=False, the expand path prefill chunks keep), with the outputs' largest difference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from machine import write_result  # benchmarks/machine.py (run as scripts: benchmarks/ is on sys.path)
from sparse_attention import LatentCache, mla_arguments, run_lengths, timed

from elasticmoe.model.batch import DecodeGroup

OUT = Path(__file__).parent / "results" / "mla_decode.json"


def run_length(attn, a, length: int) -> dict:
    """One decode group of a.rows rows, each L = length tokens long, read both ways."""
    b = a.rows
    latent = torch.randn(b, length, a.kv_lora_rank + a.rope)  # [B, L, r + rope]
    g = DecodeGroup(rows=torch.arange(b), slots=torch.arange(b), lens=torch.full((b,), length), max_len=length,
                    read=torch.arange(b * length).view(b, length))  # [B, L]: row i's block is block i
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)  # [B, 1, 1, L]: every row's whole context
    q, cache = torch.randn(b, a.heads, a.nope + a.rope), LatentCache(latent)  # [B, h, d]
    with torch.no_grad():
        expanded, expand_ms = timed(lambda: attn.decode_group(q, g, mask, cache, absorb=False), a.repeats)
        absorbed, absorbed_ms = timed(lambda: attn.decode_group(q, g, mask, cache), a.repeats)
    return {"length": length, "rows": b, "expand_ms": expand_ms, "absorbed_ms": absorbed_ms,
            "speedup": expand_ms / absorbed_ms, "max_abs_diff": float((absorbed - expanded).abs().max()),
            "max_abs": float(expanded.abs().max())}


def main() -> None:
    a = mla_arguments(__doc__, [1024, 4096], OUT).parse_args()
    rows, load_before, load_after = run_lengths(a, run_length)
    print(f"\nMLA decode attention, {a.rows} rows, {a.heads} heads, kv_lora_rank {a.kv_lora_rank}, rope {a.rope}, "
          f"nope {a.nope}, v {a.v_head_dim}, fp32, {torch.get_num_threads()} threads, median of {a.repeats}; load "
          f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'L':>7}{'expand ms':>11}{'absorbed ms':>13}{'speed-up':>10}{'max |diff|':>12}")
    for r in rows:
        print(f"{r['length']:>7}{r['expand_ms']:>11.1f}{r['absorbed_ms']:>13.2f}{r['speedup']:>9.1f}x"
              f"{r['max_abs_diff']:>12.1e}")
    write_result(a.json, vars(a), {"threads": torch.get_num_threads(), "loadavg_before": load_before,
                                   "loadavg_after": load_after, "rows": rows})


if __name__ == "__main__":
    main()
