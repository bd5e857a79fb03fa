"""OpenAI API response shapes: finish reasons, logprobs (completions' and chat's) and usage."""

from __future__ import annotations

import itertools
import re
from typing import Any

from elasticmoe.engine.sampling import TokenLogprob

# Engine finish reasons -> OpenAI's. "abort" (the engine dropped the request, e.g. on shutdown) has no
# OpenAI equivalent; like vLLM we pass it through rather than claim a natural "stop".
FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop", "abort": "abort"}


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: printable unicode char -> byte."""
    if not _BYTE_DECODER:
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = list(bs), 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_DECODER


def _token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """The token's raw bytes (a partial UTF-8 character decodes to "\\ufffd", so recover it)."""
    if "\ufffd" in text:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece or ""):
            return [int(m.group(1), 16)]
        dec = _byte_decoder()
        if piece and all(c in dec for c in piece):
            return [dec[c] for c in piece]
    return list(text.encode("utf-8"))


def _lp(v: float) -> float:
    return max(float(v), -9999.0)  # JSON has no -inf


def _texts(tokenizer: Any, lps: list[TokenLogprob]) -> dict[int, str]:
    """Each token id these logprobs name (sampled and alternatives) -> tokenizer.decode([id]), every distinct id
    decoded once and all of them in one batch_decode call: a choice of 2k tokens x 20 alternatives is 42k names,
    formatted on the HTTP event loop, where one decode call each held the loop for about a second."""
    ids = list(dict.fromkeys(itertools.chain.from_iterable(
        itertools.chain((lp.token_id,), (t for t, _ in lp.top)) for lp in lps)))
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))) if ids else {}


def completion_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int, as_ids: bool = False
                        ) -> tuple[dict, int]:
    """OpenAI completions `logprobs` for these tokens (text_offset from `offset`), and the next offset; each
    top_logprobs holds the sampled token too (as OpenAI documents: up to logprobs + 1 entries; vLLM likewise).
    `as_ids`: tokens named "token_id:<id>" (vLLM's return_tokens_as_token_ids); offsets stay in the text."""
    text_of = _texts(tokenizer, lps)
    texts = [text_of[lp.token_id] for lp in lps]
    offsets = list(itertools.accumulate((len(t) for t in texts), initial=offset))
    tokens = [f"token_id:{lp.token_id}" for lp in lps] if as_ids else texts
    name = (lambda t: f"token_id:{t}") if as_ids else text_of.__getitem__

    def top(lp: TokenLogprob) -> dict:
        out = {name(t): _lp(v) for t, v in lp.top}
        if all(t != lp.token_id for t, _ in lp.top):
            out[name(lp.token_id)] = _lp(lp.logprob)
        return out

    return {"tokens": tokens, "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [top(lp) for lp in lps], "text_offset": offsets[:-1]}, offsets[-1]


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob], as_ids: bool = False) -> dict:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    text_of = _texts(tokenizer, lps)
    bytes_of: dict[int, list[int]] = {}

    def entry(token_id: int, v: float) -> dict:
        if (b := bytes_of.get(token_id)) is None:
            b = bytes_of[token_id] = _token_bytes(tokenizer, token_id, text_of[token_id])
        return {"token": f"token_id:{token_id}" if as_ids else text_of[token_id], "logprob": _lp(v), "bytes": list(b)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps], "refusal": None}
