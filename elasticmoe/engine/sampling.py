"""Sampling parameters (validated, with field-naming errors) and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from elasticmoe.engine.validation import CONTEXT, GREEDY_BELOW, InvalidRequest, check_sampling

__all__ = ["InvalidRequest", "PenaltyState", "RowContext", "SamplingParams", "TokenLogprob", "process_logits", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 (or below 1e-5) means greedy; top_k 0 (or -1, as in vLLM, taken
    as 0) and top_p 1 mean off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: the sampled token's logprob + n top ones
    # vLLM's extensions; penalties as OpenAI and vLLM define them (see `process_logits`)
    presence_penalty: float = 0.0  # minus this for every token already in the output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # prompt + output tokens: positive logits / it, negative ones * it
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    min_tokens: int = 0  # EOS and stop_token_ids are banned (and stop strings ignored) until this many tokens
    stop_token_ids: tuple[int, ...] = ()  # finish ("stop") on any of these tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    skip_special_tokens: bool = True  # as vLLM's: special tokens add no text (False: their text is kept)

    def __post_init__(self) -> None:
        if type(self.top_k) is int and self.top_k == -1:  # vLLM's, SGLang's and transformers' "off": 0 here
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
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
                                               f"exceeds the context length {max_model_len}", CONTEXT)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Whether any penalty, bias or EOS ban changes the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


class PenaltyState:
    """A sequence's penalty inputs kept from step to step: `seen` [V] bool (prompt and output tokens, for
    repetition_penalty) and `counts` [V] (output tokens, for the frequency and presence penalties), each step
    updated with the tokens added since the last one instead of rebuilt from the whole context (a set and a sort
    of a long prompt, per row and step, on the engine thread)."""

    __slots__ = ("seen", "seen_ids", "counts", "n_output", "key")

    def __init__(self) -> None:
        self.seen: torch.Tensor | None = None
        self.seen_ids: torch.Tensor | None = None  # [S] the ids seen marks, each once
        self.counts: torch.Tensor | None = None
        self.n_output = 0  # output tokens already in seen / counts
        self.key: tuple | None = None  # (V, device, prompt list) they were built for

    def update(self, ctx: RowContext, vocab: int, device: torch.device, seen: bool, counts: bool) -> None:
        out = ctx.output_ids
        key = (vocab, device, id(ctx.prompt_ids))
        if key != self.key or len(out) < self.n_output:  # another row shape or a shorter output: start again
            self.seen = self.counts = None
            self.n_output, self.key = 0, key
        old, new = out[:self.n_output], out[self.n_output:]
        if seen and self.seen is None:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen_ids = torch.tensor(ctx.prompt_ids + old, dtype=torch.long, device=device).unique()
            self.seen[self.seen_ids] = True
        if counts and self.counts is None:
            self.counts = torch.zeros(vocab, device=device)
            if old:
                self.counts += torch.bincount(torch.tensor(old, device=device), minlength=vocab)
        if new:
            ids = torch.tensor(new, device=device)  # [n]
            if self.seen is not None:
                fresh = ids[~self.seen[ids]].unique()  # [f] not seen before
                self.seen[fresh] = True
                self.seen_ids = torch.cat((self.seen_ids, fresh))
            if self.counts is not None:
                self.counts.index_add_(0, ids, torch.ones(len(new), device=device))
        self.n_output = len(out)


@dataclass(frozen=True)
class RowContext:
    """What the logits processors of one row need: the tokens so far and the ids banned this step; `state` carries
    the penalties' inputs across steps (None: built afresh)."""

    prompt_ids: list[int]
    output_ids: list[int]
    banned: tuple[int, ...] = ()  # EOS / stop_token_ids while fewer than min_tokens are out
    state: PenaltyState | None = None


def process_logits(row: torch.Tensor, p: SamplingParams, ctx: RowContext | None) -> torch.Tensor:
    """One row of logits [V] after logit_bias, the penalties and the min_tokens ban (a new tensor).

    repetition_penalty (over prompt + output, as vLLM and transformers): a seen token's logit l becomes
    l / r if l > 0 else l * r. Then, over the output only, as OpenAI defines them:
    l -= frequency_penalty * count + presence_penalty * (count > 0).
    """
    row = row.clone()
    if p.logit_bias:  # one indexed add for all entries (the ids are distinct: a dict's keys)
        ids = torch.tensor(list(p.logit_bias), device=row.device)  # [B]
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
    if ctx is None:
        return row
    repeat = p.repetition_penalty != 1.0 and bool(ctx.prompt_ids or ctx.output_ids)
    count = bool(p.presence_penalty or p.frequency_penalty) and bool(ctx.output_ids)
    if repeat or count:
        state = ctx.state if ctx.state is not None else PenaltyState()
        state.update(ctx, row.shape[0], row.device, repeat, count)
        if repeat:
            r, at = p.repetition_penalty, state.seen_ids  # [S]
            vals = row[at]
            row[at] = torch.where(vals > 0, vals / r, vals * r)
        if count:
            counts = state.counts.to(row)  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row)
    if ctx.banned:
        row[list(ctx.banned)] = float("-inf")
    return row


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _filter(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask a row of logits [V] outside top-k / nucleus top-p / min-p with -inf."""
    if min_p > 0:  # p < min_p * p_max  <=>  logit < logit_max + log(min_p)
        logits = logits.masked_fill(logits < logits.max() + math.log(min_p), float("-inf"))
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False  # and the top token always (a top_p below float32's range reads as 0 here)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter_(0, order, drop), float("-inf"))
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One non-greedy row of logits [V] -> a token; raises on a row it cannot sample (NaN / inf)."""
    probs = _filter(logits / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           contexts: list[RowContext | None] | None = None
           ) -> tuple[list[int | None], list[TokenLogprob | None], list[Exception | None]]:
    """logits [N, V] float32 -> one token per row, its logprobs where asked for, and per-row errors.

    `contexts` (per row) feed the penalties and the min_tokens ban; logprobs are the model's own (raw logits).
    A row that cannot be sampled gets token None and its exception; the other rows are unaffected
    (each row has its own generator, so a failed row consumes nothing of another's randomness).
    """
    top = logits.argmax(-1)  # [N]; argmax picks a row's NaN (torch ranks NaN above all) or else its +inf
    picked = logits.gather(-1, top.unsqueeze(-1)).squeeze(-1)  # [N]
    broken = picked.isnan() | picked.isposinf()  # [N] O(N), not a pass over the whole [N, V]
    greedy, broken = torch.stack((top, broken.long())).tolist()  # one read from the device (a host sync), not two
    tokens: list[int | None] = []
    errors: list[Exception | None] = [None] * len(params)
    for i, p in enumerate(params):
        try:
            row = process_logits(logits[i], p, contexts[i] if contexts else None) if p.processes_logits else None
            if p.greedy:
                if broken[i]:
                    raise ValueError("the model's logits for this row are not finite (NaN or +inf)")
                tokens.append(greedy[i] if row is None else int(row.argmax()))
                continue
            tokens.append(_sample_row(logits[i] if row is None else row, p, generators[i]))
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
