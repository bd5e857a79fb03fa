"""A step's drawn rows: sample each, append its token, finish it (stop, eos, length), detokenize its text."""

from __future__ import annotations

import logging
import time

import torch

from elasticmoe.engine.endings import Endings
from elasticmoe.engine.resume import pay_draws
from elasticmoe.engine.sampling import RowContext, TokenLogprob, sample
from elasticmoe.engine.scheduler import Scheduler, Sequence
from elasticmoe.model.dense import DenseModel

log = logging.getLogger("elasticmoe.engine.engine")  # the engine's: its requests' lines under one name
__all__ = ["StepOutput", "detokenize", "text_delta"]


class StepOutput:
    """What an engine step makes of the rows whose last token ran: tokens drawn from `model`'s logits, appended to
    their sequences, which end as their params say (eos_ids: the engine's EOS ids; max_model_len: its context);
    finished through `scheduler`, a row that cannot be sampled failed through `endings` (its request alone)."""

    def __init__(self, model: DenseModel, scheduler: Scheduler, endings: Endings, eos_ids: set[int],
                 max_model_len: int):
        self.model, self.scheduler, self.endings = model, scheduler, endings
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def row(self, seq: Sequence, n: int, token: int | None, logprob, err: Exception | None) -> None:
        """One drawn row: its n tokens counted cached as its token is appended, or (an error) its request alone ends."""
        try:
            if err is not None:
                raise err
            seq.num_cached += n
            self.scheduler.written(seq)  # its prompt ran whole: its blocks may be cached (prefix caching)
            self.append(seq, token, logprob)
        except Exception as e:  # noqa: BLE001 - this row's request only
            self.endings.fail(seq, e)

    def sample(self, hidden: torch.Tensor, seqs: list[Sequence]
               ) -> tuple[list[int | None], list[TokenLogprob | None], list[Exception | None]]:
        """hidden [R, H] of the sequences whose last token ran -> (tokens, logprobs, per-row errors). Should the
        batch fail after some rows drew, their generators are rewound before the rows are sampled one by one. A resumed
        sequence's generator first makes the draws its given outputs took (resume.pay_draws)."""
        states: list = []
        try:
            logits = self.model.logits(hidden)  # [R, V]
            pay_draws(seqs, logits)
            states = [(s.generator, s.generator.get_state()) for s in seqs if s.generator is not None]
            return sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                          [self.context(s) for s in seqs])
        except Exception:  # noqa: BLE001 - find the row it belongs to
            log.exception("sampling failed; sampling its %d rows one by one", len(seqs))
        for g, state in states:
            g.set_state(state)
        out: tuple[list, list, list] = ([], [], [])
        for i, s in enumerate(seqs):
            try:
                logits = self.model.logits(hidden[i:i + 1])  # [1, V]
                pay_draws([s], logits)
                tok, lp, err = sample(logits, [s.params], [s.generator], [self.context(s)])
                row = (tok[0], lp[0], err[0])
            except Exception as e:  # noqa: BLE001 - this row only
                row = (None, None, e)
            for acc, v in zip(out, row):
                acc.append(v)
        return out

    def context(self, seq: Sequence) -> RowContext | None:
        """The penalties' view of a sequence; EOS and stop_token_ids banned while it is under min_tokens."""
        p = seq.params
        if not p.processes_logits:
            return None
        early = len(seq.output_ids) < p.min_tokens
        banned = tuple(sorted(((set() if p.ignore_eos else self.eos_ids) | set(p.stop_token_ids)))) if early else ()
        return RowContext(seq.prompt_ids, seq.output_ids, banned, seq.penalty)

    def append(self, seq: Sequence, token: int, logprob) -> None:
        """seq's next token (and its logprob); it finishes at a stop token or string, an EOS, or its length."""
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        p = seq.params
        stop_token, eos = token in p.stop_token_ids, not p.ignore_eos and token in self.eos_ids
        if stop_token or eos:  # as vLLM: the token that ends the completion is kept, its text is not rendered
            seq.text_end = len(seq.output_ids) - 1
        if p.stop:  # stop strings count from min_tokens on (text that came before is not searched)
            seq.detok.update(seq.text_ids, search=len(seq.output_ids) >= p.min_tokens)
        if seq.detok.stop_at is not None or stop_token:
            self.finish(seq, "stop")
        elif eos:
            self.finish(seq, "eos")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.endings.forget(seq)
        detokenize(seq)


def detokenize(seq: Sequence) -> str:
    """Completion text so far (cut before a stop string, once one appears); O(text), see `text_delta`."""
    seq.detok.update(seq.text_ids, search=False)  # stop strings were looked for as each token came
    seq.text = seq.detok.text
    return seq.text


def text_delta(seq: Sequence) -> str:
    """The text of `seq` not handed out yet that can no longer change (all the rest once it finished);
    costs a decode of a few recent tokens, whatever the length."""
    seq.detok.update(seq.text_ids, search=False)
    return seq.detok.delta(final=seq.finished)
