"""What the engine reads from a checkpoint besides weights: its tokenizer and generation_config.json defaults."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)


def load_tokenizer(path: Any) -> Any:
    """The checkpoint's tokenizer (AutoTokenizer), or CheckpointError naming the directory: one transformers cannot
    build, or one with special tokens only, which transformers builds from a directory with no tokenizer files (and
    every prompt then encoded to nothing: "prompt: the prompt is empty")."""
    from transformers import AutoTokenizer

    from elasticmoe.model import CheckpointError

    want = "tokenizer.json, or the tokenizer.model / vocab files its tokenizer_config.json names"
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        said = " ".join(str(e).split())[:300] or type(e).__name__  # transformers' is several lines
        raise CheckpointError(f"{path}: no tokenizer transformers can load ({said}); it needs {want}") from e
    if not set(tok.get_vocab()) - set(tok.all_special_tokens):
        raise CheckpointError(f"{path}: no tokenizer files (the tokenizer transformers made has only its "
                              f"{len(tok)} special token(s)); it needs {want}")
    return tok


GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_p", "max_new_tokens")


def generation_config(path: Any) -> tuple[dict[str, Any], set[int]]:
    """The checkpoint's generation_config.json: (its sampling defaults, as vLLM takes them, and its EOS ids);
    max_new_tokens becomes max_tokens, as in vLLM."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return {}, set()
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not valid JSON; ignored", f)
        return {}, set()
    eos = raw.get("eos_token_id")
    eos_ids = {t for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int)}  # range: eos_token_ids
    out = {k: raw[k] for k in GENERATION_DEFAULT_KEYS if isinstance(raw.get(k), (int, float))}
    for k in ("top_k", "max_new_tokens"):
        if isinstance(out.get(k), float) and out[k].is_integer():  # e.g. top_k 20.0, as some checkpoints write it
            out[k] = int(out[k])
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    return out, eos_ids


def eos_token_ids(sources: Iterable[tuple[str, Iterable[Any]]], vocab_size: int) -> set[int]:
    """The EOS ids of `sources` ((where, e.g. "<ckpt>/config.json eos_token_id"; its ids)) that the model can
    sample: integers in [0, vocab_size). Any other is dropped with a warning naming where it came from, as
    transformers' generate ignores it (its EOS masks and stopping criteria match only ids the logits have; a
    negative one it warns of): held, it failed every request under min_tokens (whose ban indexes the logits)."""
    out: set[int] = set()
    for where, ids in sources:
        for t in ids:
            if isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size:
                out.add(t)
            else:
                log.warning("%s: EOS id %r is outside the vocabulary [0, %d); ignored (as transformers does)",
                            where, t, vocab_size)
    return out
