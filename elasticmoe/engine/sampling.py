"""Sampling parameters (validated, with field-naming errors) and the batched sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class InvalidRequest(ValueError):
    """A request field is out of range; `field` names it (mapped to INVALID_ARGUMENT / HTTP 400)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message

    def __reduce__(self):  # picklable across Ray processes
        return (type(self), (self.field, self.message))


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

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
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self, max_model_len: int | None = None, prompt_len: int = 0) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if max_model_len is not None and prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequest("max_tokens", f"prompt ({prompt_len}) + max_tokens ({self.max_tokens}) "
                                               f"exceeds the context length {max_model_len}")
        if not self.temperature >= 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop", "stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [N, V] float32 -> one token per row, and its logprobs where asked for."""
    greedy = logits.argmax(-1).tolist()
    tokens: list[int] = []
    for i, p in enumerate(params):
        if p.greedy:
            tokens.append(greedy[i])
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    lps: list[TokenLogprob | None] = [None] * len(params)
    if want:
        logp = logits[want].log_softmax(-1)  # [W, V]
        for j, i in enumerate(want):
            n = params[i].logprobs
            top = logp[j].topk(n) if n else None
            alts = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
            lps[i] = TokenLogprob(tokens[i], float(logp[j, tokens[i]]), alts)
    return tokens, lps
