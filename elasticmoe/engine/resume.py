"""Resuming a stream another gateway replica started: its client's tokens and text taken as the outputs so far."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from elasticmoe.engine.validation import InvalidRequest, short

TOKENS, CHARS = "resume.token_ids", "resume.text_chars"


@dataclass(frozen=True)
class Resume:
    """What the client of a broken stream received: every output token id, and the characters (code points) of the
    text it got. The request goes on as if those tokens had been generated here: max_tokens, the penalties and
    min_tokens count them, the text continues at character `text_chars`, a seeded generator draws what it would
    have drawn next. Their logprobs are not sent again."""

    token_ids: tuple[int, ...] = ()
    text_chars: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(self.token_ids))


def check_resume(resume: Resume, vocab_size: int, max_tokens: int) -> None:
    """InvalidRequest naming the field: ids outside the vocabulary, as many as max_tokens (nothing left to generate:
    the completion had ended) or more, a character count that is no count, or text without tokens."""
    ids, chars = resume.token_ids, resume.text_chars
    if isinstance(chars, bool) or not isinstance(chars, Integral) or chars < 0:
        raise InvalidRequest(CHARS, f"must be a count of characters (>= 0), got {short(chars)}")
    if chars and not ids:
        raise InvalidRequest(CHARS, f"{chars} characters of text from no tokens")
    if len(ids) >= max_tokens:
        raise InvalidRequest(TOKENS, f"{len(ids)} tokens received, max_tokens is {max_tokens}: the completion had "
                                     f"ended, nothing is left to generate")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, Integral) or not 0 <= t < vocab_size:
            raise InvalidRequest(f"{TOKENS}[{i}]", f"token id {short(t)} is outside the vocabulary [0, {vocab_size})")


def resume_sequence(seq: Any, resume: Resume, eos_ids: frozenset[int] | set[int]) -> None:
    """Take resume's tokens as seq's outputs so far (a Sequence not yet queued; check_resume passed): its
    detokenizer advanced over them token by token (stop strings looked for from min_tokens on, as the engine does;
    its text is stable at least as early as when it was updated per message), the text marked handed out up to
    text_chars, and the generator draws they took owed (paid before its next draw, StepOutput.sample). InvalidRequest
    where the completion would have ended within them (an EOS, a stop token, a stop string) or the client holds
    more text than they make."""
    p, out, detok = seq.params, [], seq.detok
    for i, t in enumerate(resume.token_ids):
        if t in p.stop_token_ids or (not p.ignore_eos and t in eos_ids):
            raise InvalidRequest(f"{TOKENS}[{i}]", f"token {t} ends the completion (EOS or a stop token): a "
                                                  f"stream that ended there is not resumed")
        out.append(t)  # token by token, as StepOutput.append (stop strings) or at most as often as messages went out
        detok.update(out, search=bool(p.stop) and len(out) >= p.min_tokens)  # (text is stable at least as early)
        if detok.stop_at is not None:
            raise InvalidRequest(TOKENS, f"the text of the first {len(out)} contains a stop string: the "
                                         f"completion ended there")
    stable = detok.length - detok.held()  # what deltas can have handed out
    if resume.text_chars > stable:
        raise InvalidRequest(CHARS, f"{resume.text_chars} characters; the {len(out)} tokens make {stable} that a "
                                    f"stream hands out")
    detok.mark_sent(resume.text_chars)
    seq.output_ids = out
    seq.logprobs = [None] * len(out) if p.logprobs is not None else []  # the client has theirs
    if seq.generator is not None and not p.greedy:
        seq.draws_owed = len(out)


def pay_draws(seqs: list[Any], logits: torch.Tensor) -> None:
    """Advance each sequence's generator by the draws its resumed tokens took (logits [R, V]: their width and
    device): one multinomial over V entries per token, as sampling.sample draws each non-greedy token. What a draw
    consumes of a generator depends on V and the device (torch draws V exponentials for one sample), never on the
    probabilities, so a dummy draw consumes exactly what the real one did."""
    for s in seqs:
        n, s.draws_owed = getattr(s, "draws_owed", 0), 0
        if n:
            probs = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)  # [V]
            for _ in range(n):
                torch.multinomial(probs, 1, generator=s.generator)
