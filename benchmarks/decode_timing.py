"""Decode tokens/s from two timed runs (new_tokens and one token), shared by offline.py and real_width.py."""

from __future__ import annotations


def decode_tok_s(batch: int, new_tokens: int, t_full: float, t_one: float) -> float:
    """batch x (new_tokens - 1) tokens over the time a full run takes beyond a one-token run (prefill and set-up
    cancel). SystemExit when noise leaves no positive difference (a loaded machine, too few tokens)."""
    if t_full <= t_one:
        raise SystemExit(f"{new_tokens} tokens took {t_full * 1e3:.1f} ms, one token {t_one * 1e3:.1f} ms: timing "
                         f"noise exceeds the decode time; raise --new-tokens or --repeats")
    return batch * (new_tokens - 1) / (t_full - t_one)
