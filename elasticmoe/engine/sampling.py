"""Sampling parameters (validated, with field-naming errors) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from elasticmoe.engine.validation import GREEDY_BELOW, InvalidRequest, check_sampling

__all__ = ["InvalidRequest", "SamplingParams", "TokenLogprob", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 (or below 1e-5) means greedy; top_k 0 and top_p 1 mean off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: the sampled token's logprob + n top ones

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        elif not isinstance(self.stop, tuple):
            raise InvalidRequest("stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
        self.validate()

    def validate(self, max_model_len: int | None = None, prompt_len: int = 0) -> None:
        """Raise InvalidRequest naming the first bad field (types, ranges, finiteness, the context length)."""
        check_sampling(self)
        if max_model_len is not None and prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequest("max_tokens", f"prompt ({prompt_len}) + max_tokens ({self.max_tokens}) "
                                               f"exceeds the context length {max_model_len}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask a row of logits [V] outside top-k / nucleus top-p with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One non-greedy row of logits [V] -> a token; raises on a row it cannot sample (NaN / inf)."""
    probs = _filter(logits / p.temperature, p.top_k, p.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> tuple[list[int | None], list[TokenLogprob | None], list[Exception | None]]:
    """logits [N, V] float32 -> one token per row, its logprobs where asked for, and per-row errors.

    A row that cannot be sampled gets token None and its exception; the other rows are unaffected
    (each row has its own generator, so a failed row consumes nothing of another's randomness).
    """
    greedy = logits.argmax(-1).tolist()
    tokens: list[int | None] = []
    errors: list[Exception | None] = [None] * len(params)
    for i, p in enumerate(params):
        if p.greedy:
            tokens.append(greedy[i])
            continue
        try:
            tokens.append(_sample_row(logits[i], p, generators[i]))
        except Exception as e:  # noqa: BLE001 - attributed to this row's request only
            tokens.append(None)
            errors[i] = e
    want = [i for i, p in enumerate(params) if p.logprobs is not None and tokens[i] is not None]
    lps: list[TokenLogprob | None] = [None] * len(params)
    if want:
        logp = logits[want].log_softmax(-1)  # [W, V]
        for j, i in enumerate(want):
            n = params[i].logprobs
            top = logp[j].topk(min(n, logp.shape[-1])) if n else None
            alts = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
            lps[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), alts)
    return tokens, lps, errors
