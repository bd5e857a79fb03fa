"""A step's forward for the engine, and on failure the requests it belongs to: retries, halves, one by one."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from elasticmoe.engine.scheduler import Sequence
from elasticmoe.model.attention import KVCache
from elasticmoe.model.batch import build_batch, build_batches
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.dispatch import Dispatcher, ExpertsUnavailable
from elasticmoe.model.pipeline import micro_batch_count, split_even

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = (0.05, 0.2, 0.5, 1.0)  # sleeps between attempts of a step whose experts were unavailable
MIN_PIECE_TOKENS = 16  # a prefill chunk out of memory is cut down to pieces this small (Limits' least step), no less
BUDGET_HOLD_S = 30.0  # how long the step budget stays at the piece that fit, once a chunk had to be cut to fit

Work = list[tuple[Sequence, int]]  # (sequence, tokens it runs this step), as Scheduler.schedule gives them
Outcome = tuple[torch.Tensor, Work, list[Sequence]]  # (hidden [N, H], the work it is for, the sequences that failed)


class TokenBudget:
    """The tokens of an engine step: `configured` (max_num_batched_tokens), or, for `hold_s` after a step had to be
    run in smaller runs to fit a shard's memory, the largest run that fit (a prefill chunk's piece, or a half of the
    step's decodes), so that the scheduler cuts the next steps' chunks and decodes before they hit the same wall
    (each hit costs runs that fail); then `configured` again, to find out whether the memory came back (a step
    that still does not fit lowers it again)."""

    def __init__(self, tokens: int, hold_s: float = BUDGET_HOLD_S):
        self.configured, self.hold_s = tokens, hold_s
        self.lowered: int | None = None  # the piece that fit, while held
        self.until = 0.0  # time.monotonic() when the hold ends

    def lower(self, tokens: int) -> None:
        """A step fit in runs of `tokens` where more did not: hold the budget there (or lower)."""
        self.lowered = min(tokens, self.lowered or self.configured)
        self.until = time.monotonic() + self.hold_s
        log.warning("step budget lowered to %d tokens for %.0fs (a step fit a shard's memory only in smaller runs)",
                    self.lowered, self.hold_s)

    def tokens(self) -> int:
        """This step's token budget."""
        if self.lowered is not None and time.monotonic() >= self.until:
            log.info("step budget back to %d tokens", self.configured)
            self.lowered = None
        return self.configured if self.lowered is None else self.lowered


class StepForward:
    """Runs the dense half of a step's work (experts through `dispatcher`), KV into `cache`. A failure ends only the
    requests it belongs to, through `fail(sequence, error)`: a step whose experts were unavailable is retried with
    backoff (KV writes are keyed by position, so a step can be repeated; its halves, pieces and lone runs too, from
    the same retries), then each sequence is run alone (at once where a retry would fail alike: `deterministic`);
    one that failed for its size (a shard out of memory for its tokens) is run in halves at once, and a prefill
    chunk that fails so alone is cut into a smaller piece (`budget` then lowered for a while to the largest run
    that fit: piece, or half where every sequence ran)."""

    def __init__(self, model: DenseModel, cache: KVCache, dispatcher: Dispatcher, device: torch.device,
                 fail: Callable[[Sequence, Exception], None], budget: TokenBudget, *,
                 retry_backoff_s: tuple[float, ...] = RETRY_BACKOFF_S, micro_batches: int = 2,
                 pipeline_min_tokens: int = 8):
        self.model, self.cache, self.dispatcher, self.device, self.fail = model, cache, dispatcher, device, fail
        self.budget, self.min_piece = budget, MIN_PIECE_TOKENS
        self.retry_backoff_s = retry_backoff_s
        self.micro_batches = micro_batches  # with a remote dispatcher, a big enough step is cut into this many
        self.pipeline_min_tokens = pipeline_min_tokens
        self.retries = 0  # attempts repeated after ExpertsUnavailable
        self._attempt = 0  # the running step's retries so far
        self._fit = self._piece_fit = 0  # tokens of the largest half / prefill piece that fit, while a step that
        # failed for its size is run smaller

    def __call__(self, work: Work) -> Outcome:
        """(hidden [N, H], the work it is for, the sequences that failed) for this step's work."""
        self._attempt = 0  # retries of this step so far: its halves, pieces and lone runs share them
        try:
            return self._try(work), work, []
        except ExpertsUnavailable as e:  # transient: all copies of some experts failed this step
            if e.for_its_size:  # out of memory for these tokens: the same step would fail the same way
                log.warning("step failed (%s); running its %d sequences in halves", e, len(work))
                self._fit = self._piece_fit = 0
                out = self._halve(work, e)
                # the next steps' budget while it holds: the largest run that fit, a half only when every sequence
                # ran (one that ended even at the floor leaves the wall unknown: the halves beside it may be small)
                if fit := self._piece_fit if out[2] else max(self._fit, self._piece_fit):
                    self.budget.lower(fit)
                return out
            why = "as it would again" if e.deterministic else "after retries"  # a retry fails alike / none left
            log.warning("step failed %s (%s); running its %d sequences one by one", why, e, len(work))
            return self._isolate(work)
        except Exception:  # noqa: BLE001 - not transient: find the sequences it belongs to
            log.exception("step failed; running its %d sequences one by one", len(work))
            return self._isolate(work)

    def _try(self, work: Work) -> torch.Tensor:
        """hidden [N, H] of one run of `work` (the step, a half, a piece, one sequence); experts unavailable for a
        moment, it is repeated with backoff while the step's retries last (retry_backoff_s, shared by all its
        runs); raises what a retry would not mend (for its size, deterministic) or what is left after them."""
        chunks = self._chunks(work)
        while True:
            self._begin()
            try:
                return self._run(chunks)
            except ExpertsUnavailable as e:
                if e.for_its_size or e.deterministic or self._attempt == len(self.retry_backoff_s):
                    raise
                log.warning("step failed (%s); retry %d in %.2fs", e, self._attempt + 1,
                            self.retry_backoff_s[self._attempt])
                self.retries += 1
                time.sleep(self.retry_backoff_s[self._attempt])
                self._attempt += 1

    def _chunks(self, work: Work) -> list[tuple[int, int, list[int]]]:
        return [(s.slot, s.num_cached, [s.token(i) for i in range(s.num_cached, s.num_cached + n)]) for s, n in work]

    def _begin(self) -> None:
        begin = getattr(self.dispatcher, "begin_step", None)
        if begin is not None:
            begin()

    def _isolate(self, work: Work) -> Outcome:
        """Run each sequence's part of the step alone; end only those that still fail."""
        kept, rows, failed = [], [], []
        for s, n in work:
            try:
                rows.append(self._try([(s, n)]))
                kept.append((s, n))
            except Exception as e:  # noqa: BLE001 - this sequence only
                self.fail(s, e)
                failed.append(s)
        return self._rows(rows), kept, failed

    def _halve(self, work: Work, error: Exception) -> Outcome:
        """The work of a step that failed for its size (`error`), in two runs of about half its tokens each (cut at
        sequence boundaries, so a long prompt's chunk runs apart from the rest); a run that fails too is halved in
        turn, and a sequence that fails alone is cut smaller (_piece). One request too large among N costs about
        2 log2 N runs."""
        if len(work) == 1:
            return self._piece(*work[0], error)
        rows, kept, failed = [], [], []
        for a, b in split_even([n for _, n in work], 2):
            part = work[a:b]
            try:
                hidden = self._try(part)
            except Exception as e:  # noqa: BLE001 - this part only: smaller still
                hidden, part_kept, part_failed = self._halve(part, e)
            else:
                part_kept, part_failed = part, []
                self._fit = max(self._fit, sum(n for _, n in part))
            rows.append(hidden)
            kept += part_kept
            failed += part_failed
        return self._rows(rows), kept, failed

    def _piece(self, seq: Sequence, n: int, error: Exception) -> Outcome:
        """A sequence's chunk of `n` tokens that failed alone (`error`). Failed for its size (a prefill chunk out of
        memory): its first piece of about half as many tokens is run, halved again while it fails so, down to
        min_piece; the rest is left to the scheduler's next steps (a chunked prefill), whose budget is lowered (to
        the piece that fit, or a larger half of the step that fit). Otherwise, or at min_piece (a decode too), it
        ends. Runs: at most log2(n / min_piece)."""
        size = n
        while getattr(error, "for_its_size", False) and max(self.min_piece, (size + 1) // 2) < size:
            size = max(self.min_piece, (size + 1) // 2)
            try:
                hidden = self._try([(seq, size)])
            except Exception as e:  # noqa: BLE001 - this sequence only: smaller still, or it ends
                error = e
                continue
            log.warning("a prefill chunk of %d tokens failed (%s); ran its first %d tokens", n, error, size)
            self._piece_fit = max(self._piece_fit, size)
            return hidden, [(seq, size)], []
        self.fail(seq, error)
        return self._rows([]), [], [seq]

    def _rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The hidden rows [N, H] of the runs that succeeded, in order (none: [0, H])."""
        parts = [p for p in parts if p.shape[0]]
        return torch.cat(parts) if parts else torch.empty(0, self.model.spec.hidden_size, device=self.device)

    def _run(self, chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Forward the step, reporting its routing to model.route_observer (the expert-token metrics) once it
        succeeded: an attempt that failed is repeated (retries, then one sequence at a time), and its routing
        counted each time inflated the tokens per expert exactly while experts were failing."""
        observer = self.model.route_observer
        if observer is None:
            return self._run_forward(chunks)
        seen: list[tuple[int, torch.Tensor]] = []
        self.model.route_observer = lambda layer, ids: seen.append((layer, ids))
        try:
            out = self._run_forward(chunks)
        finally:
            self.model.route_observer = observer
        for layer, ids in seen:
            observer(layer, ids)
        return out

    def _run_forward(self, chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Forward the step; with a remote dispatcher and enough tokens, as pipelined micro-batches (ping-pong)."""
        sizes = [len(c[2]) for c in chunks]
        n = micro_batch_count(sum(sizes), len(chunks), self.micro_batches, self.pipeline_min_tokens)
        if not getattr(self.dispatcher, "remote", False) or n < 2:
            return self.model.forward(build_batch(chunks, self.device, self.cache.table), self.cache, self.dispatcher)
        parts = build_batches([chunks[a:b] for a, b in split_even(sizes, n)], self.device,
                              self.cache.table)  # at sequence boundaries
        return torch.cat(self.model.forward_pipelined(parts, self.cache, self.dispatcher))
