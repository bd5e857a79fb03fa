"""One validation layer for every front door (gRPC, HTTP, offline LLM): types, ranges and size limits."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

_UNPRINTED = {"Cc", "Cf", "Zl", "Zp"}  # control, format (bidi overrides), line and paragraph separators

GREEDY_BELOW = 1e-5  # a temperature below this means greedy, as in vLLM
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32: 0 < temperature below it underflows logits / t
SEED_RANGE = (-(1 << 63), 1 << 64)  # a seed must fit 64 bits (signed or unsigned)
INT32_MAX = (1 << 31) - 1


NOT_IDS = (str, bytes, bytearray, memoryview, dict, set, frozenset)  # sized iterables that are no list of token ids
CONTEXT = "context_length_exceeded"  # an InvalidRequest code: the prompt (with max_tokens) does not fit the context


class InvalidRequest(ValueError):
    """A request field is out of range; `field` names it (mapped to INVALID_ARGUMENT / HTTP 400); `code` says how,
    as OpenAI's error codes do: invalid_value (the default), context_length_exceeded, unsupported_value, ..."""

    def __init__(self, field_name: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message, self.code = field_name, message, code

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.field, self.message, self.code))


@dataclass(frozen=True)
class RequestLimits:
    """Size limits of one request (from `AppArgs.limits`); every default is safe for a public endpoint."""

    max_stop_strings: int = 16
    max_stop_len: int = 256  # characters per stop string
    max_request_id_len: int = 256  # characters
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a text prompt (checked before tokenizing)
    max_prompt_tokens: int | None = None  # None: the context length minus one
    max_logprobs: int = 20
    max_stop_token_ids: int = 16
    max_logit_bias: int = 1024  # entries
    max_body_bytes: int = 4 << 20  # HTTP request body (413 above it)
    max_json_depth: int = 32  # nesting of an HTTP body

    @classmethod
    def of(cls, limits: Any) -> "RequestLimits":
        """From any object with same-named attributes (e.g. `AppArgs.limits`); missing ones keep the default."""
        names = [f.name for f in fields(cls)]
        return cls(**{n: getattr(limits, n) for n in names if getattr(limits, n, None) is not None})


def clip(text: str, limit: int = 200) -> str:
    """Text (a path, a URL) as an error repeats it: cut to `limit` characters, however long the input."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short(value: Any, limit: int = 80) -> str:
    """A repr for error messages that never grows with the input (nor recurses through it)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"<{type(value).__name__}>"
    return clip(text, limit)


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """An integer (never a bool or float) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, Integral):
        raise InvalidRequest(name, f"must be an integer, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidRequest(name, f"must be {'in ' if hi is not None else ''}{bound}, got {short(v)}")
    return v


def check_float(name: str, v: Any) -> float:
    """A finite real number (an int is fine; bool, inf and NaN are not)."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise InvalidRequest(name, f"must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise InvalidRequest(name, f"must be a finite number, got {short(v)}")
    return f


def check_text(name: str, s: Any, max_chars: int | None = None, max_bytes: int | None = None) -> str:
    """A string of valid Unicode (no lone surrogates) within the size limits."""
    if not isinstance(s, str):
        raise InvalidRequest(name, f"must be a string, got {type(s).__name__}")
    if max_chars is not None and len(s) > max_chars:
        raise InvalidRequest(name, f"is {len(s)} characters long; the limit is {max_chars}")
    try:
        n = len(s.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidRequest(name, f"is not valid Unicode: lone surrogate {s[e.start]!r} at index {e.start}") from None
    if max_bytes is not None and n > max_bytes:
        raise InvalidRequest(name, f"is {n} bytes of UTF-8; the limit is {max_bytes}")
    return s


def stop_field(i: int, n: int) -> str:
    """The name of the i-th of a request's n stop strings in an error: "stop[i]" of several, "stop" of one (as
    generation.proto documents it, and as the OpenAI API takes one stop string: a string)."""
    return f"stop[{i}]" if n > 1 else "stop"


def check_sampling(p: Any) -> None:
    """Intrinsic checks of a SamplingParams (types, ranges, finiteness); size limits are the Validator's."""
    check_int("max_tokens", p.max_tokens, 1, INT32_MAX)
    t = check_float("temperature", p.temperature)
    if t < 0:
        raise InvalidRequest("temperature", f"must be >= 0, got {t}")
    if 0 < t < FLOAT32_TINY:
        raise InvalidRequest("temperature", f"{t} underflows (below {FLOAT32_TINY:.3g}); use 0 for greedy")
    top_p = check_float("top_p", p.top_p)
    if not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, Integral):
        raise InvalidRequest("top_k", f"must be an integer, got {type(p.top_k).__name__}")
    if not -1 <= p.top_k <= INT32_MAX:  # -1: vLLM's "off", which SamplingParams takes as 0
        raise InvalidRequest("top_k", f"must be 0 or -1 (off) or in [1, {INT32_MAX}], got {short(p.top_k)}")
    if p.seed is not None:
        check_int("seed", p.seed, SEED_RANGE[0], SEED_RANGE[1] - 1)
    for i, s in enumerate(p.stop):
        check_text(stop_field(i, len(p.stop)), s)
        if not s:
            raise InvalidRequest(stop_field(i, len(p.stop)), "stop strings must be non-empty")
    for name in ("ignore_eos", "skip_special_tokens"):
        v = getattr(p, name, False)  # a gRPC request has no skip_special_tokens
        if not isinstance(v, bool):
            raise InvalidRequest(name, f"must be a boolean, got {type(v).__name__}")
    if p.logprobs is not None:
        check_int("logprobs", p.logprobs, 0, INT32_MAX)
    _check_extensions(p)


def _check_extensions(p: Any) -> None:
    """Penalties, min_p, min_tokens, stop_token_ids and logit_bias (the fields vLLM adds to OpenAI's)."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = check_float(name, getattr(p, name, 0.0))
        if not -2.0 <= v <= 2.0:
            raise InvalidRequest(name, f"must be in [-2, 2], got {v}")
    r = check_float("repetition_penalty", getattr(p, "repetition_penalty", 1.0))
    if not 0 < r <= 100:
        raise InvalidRequest("repetition_penalty", f"must be in (0, 100], got {r}")
    m = check_float("min_p", getattr(p, "min_p", 0.0))
    if not 0 <= m <= 1:
        raise InvalidRequest("min_p", f"must be in [0, 1], got {m}")
    check_int("min_tokens", getattr(p, "min_tokens", 0), 0, p.max_tokens)
    ids = getattr(p, "stop_token_ids", ())
    if not isinstance(ids, tuple):
        raise InvalidRequest("stop_token_ids", f"must be a list of token ids, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        check_int(f"stop_token_ids[{i}]", t, 0, INT32_MAX)
    bias = getattr(p, "logit_bias", {})
    if not isinstance(bias, dict):
        raise InvalidRequest("logit_bias", f"must map token ids to numbers, got {type(bias).__name__}")
    for t, v in bias.items():
        check_int("logit_bias", t, 0, INT32_MAX)
        if not -100 <= check_float(f"logit_bias[{t}]", v) <= 100:
            raise InvalidRequest(f"logit_bias[{t}]", f"must be in [-100, 100], got {v}")


class Validator:
    """Request-level checks against the model and the limits; cheap, thread-safe (reads only constants).
    kv_cache_tokens: the KV cache's positions (limits.kv_cache_tokens), where a request's prompt and max_tokens must
    fit (its blocks are reserved at admission); None: any request within max_model_len fits."""

    def __init__(self, vocab_size: int, max_model_len: int, limits: RequestLimits | None = None,
                 kv_cache_tokens: int | None = None):
        self.vocab_size, self.max_model_len, self.kv_cache_tokens = vocab_size, max_model_len, kv_cache_tokens
        self.limits = limits or RequestLimits()
        lim = self.limits.max_prompt_tokens
        self.max_prompt_tokens = min(lim, max_model_len - 1) if lim is not None else max_model_len - 1

    def request_id(self, rid: Any) -> str:
        """Printable text: the id goes into the gateway's log, where a newline would forge a line."""
        check_text("request_id", rid, max_chars=self.limits.max_request_id_len)
        if not rid.isprintable() and any(unicodedata.category(c) in _UNPRINTED for c in rid):
            raise InvalidRequest("request_id",
                                 "control characters (newlines, tabs, escapes, bidi overrides) are not allowed")
        return rid

    def prompt_text(self, prompt: Any, name: str = "prompt") -> str:
        """Before tokenizing: a non-empty string of valid Unicode within max_prompt_bytes."""
        check_text(name, prompt, max_bytes=self.limits.max_prompt_bytes)
        if not prompt:
            raise InvalidRequest(name, "the prompt is empty")
        return prompt

    def encode(self, tokenizer: Any, prompt: Any, name: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Check and tokenize a text prompt (with the tokenizer's special tokens, e.g. BOS, unless told not); a
        tokenizer failure on this input is the input's fault."""
        self.prompt_text(prompt, name)
        try:
            return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        except Exception as e:  # noqa: BLE001 - e.g. characters the tokenizer cannot take
            raise InvalidRequest(name, f"the tokenizer rejected it: {short(str(e), 200)}") from None

    def prompt_ids(self, ids: Any, name: str = "prompt_token_ids") -> list[int]:
        """Token ids: a non-empty list of ints in [0, vocab_size), at most max_prompt_tokens of them."""
        if isinstance(ids, NOT_IDS) or not hasattr(ids, "__len__"):  # (gRPC's repeated fields have no __iter__)
            raise InvalidRequest(name, f"must be a list of token ids, got {type(ids).__name__}")
        if not ids:
            raise InvalidRequest(name, "the prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(name, f"{len(ids)} tokens; the limit is {self.max_prompt_tokens}", CONTEXT)
        out = list(ids)
        for t in out:
            if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(name, f"token id {short(t)} is outside the vocabulary [0, {self.vocab_size})")
        return out

    def default_max_tokens(self, prompt_len: int, cap: int) -> int:
        """The max_tokens of a request that leaves it unset, on every door (vLLM's rule): `cap` (the door's default,
        or generation_config's max_new_tokens where less) cut to the context the prompt leaves (and the room it leaves
        in the KV cache, when that is smaller), at least 1 (a prompt that fills the context is refused by `prompt_ids`
        before this)."""
        room = min(self.max_model_len, self.kv_cache_tokens or self.max_model_len)
        return min(cap, max(1, room - prompt_len))

    def request(self, ids: list[int], params: Any) -> None:
        """A queued request as a whole: prompt ids, sampling, the limits and the context length."""
        self.prompt_ids(ids)
        check_sampling(params)
        lim = self.limits
        if len(params.stop) > lim.max_stop_strings:
            raise InvalidRequest("stop", f"{len(params.stop)} stop strings; the limit is {lim.max_stop_strings}")
        for i, s in enumerate(params.stop):
            if len(s) > lim.max_stop_len:
                raise InvalidRequest(stop_field(i, len(params.stop)), f"a stop string of {len(s)} characters; the "
                                                                      f"limit is {lim.max_stop_len}")
        for name, toks, most in (("stop_token_ids", params.stop_token_ids, lim.max_stop_token_ids),
                                 ("logit_bias", params.logit_bias, lim.max_logit_bias)):
            if len(toks) > most:  # each step looks at every entry of every row: held to limits.max_<name>
                raise InvalidRequest(name, f"{len(toks)} entries; the limit is {most} (limits.max_{name})")
            bad = [t for t in toks if t >= self.vocab_size]
            if bad:
                raise InvalidRequest(name, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if params.logprobs is not None and params.logprobs > lim.max_logprobs:
            raise InvalidRequest("logprobs", f"must be in [0, {lim.max_logprobs}], got {params.logprobs}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest("max_tokens", f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) "
                                               f"exceeds the context length {self.max_model_len}", CONTEXT)
        if self.kv_cache_tokens is not None and len(ids) + params.max_tokens > self.kv_cache_tokens:
            raise InvalidRequest("max_tokens", f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds the "
                                               f"KV cache's {self.kv_cache_tokens} tokens (limits.kv_cache_tokens)",
                                 CONTEXT)
