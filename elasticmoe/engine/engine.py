"""The step loop: schedule, run the dense half (experts through a dispatcher), sample, detokenize, finish."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from elasticmoe.engine.checkpoint_defaults import generation_config, load_tokenizer
from elasticmoe.engine.detok import Detokenizer, prompt_context
from elasticmoe.engine.sampling import InvalidRequest, RowContext, SamplingParams, TokenLogprob, sample
from elasticmoe.engine.scheduler import RequestFailed, Scheduler, Sequence, Status
from elasticmoe.engine.validation import RequestLimits, Validator
from elasticmoe.model import ModelFiles
from elasticmoe.model.attention import KVCache
from elasticmoe.model.batch import build_batch
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.dispatch import Dispatcher, ExpertsUnavailable
from elasticmoe.model.pipeline import micro_batch_count, split_even

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
RETRY_BACKOFF_S = (0.05, 0.2, 0.5, 1.0)  # sleeps between attempts of a step whose experts were unavailable


class Engine:
    """A continuous-batching engine over one DenseModel; experts run wherever the dispatcher sends them."""

    def __init__(self, files: ModelFiles, dispatcher: Dispatcher, *, dtype: str = "float32", device: str = "cpu",
                 max_num_seqs: int = 16, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 max_queue: int = 1024, tokenizer: Any = None, pipeline_min_tokens: int = 8,
                 micro_batches: int = 2, limits: RequestLimits | None = None,
                 retry_backoff_s: tuple[float, ...] = RETRY_BACKOFF_S):
        self.files, self.spec, self.dispatcher = files, files.spec, dispatcher
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        limit = self.spec.max_position_embeddings  # config.json's, or what its rotary scaling allows (spec.py)
        if max_model_len is not None and max_model_len > limit:  # as vLLM: never a shorter context than asked for
            raise ValueError(f"max_model_len: {max_model_len} is more than the model's context length, {limit}; "
                             f"set max_model_len (served: limits.max_model_len) to at most {limit}")
        self.max_model_len = max_model_len or limit
        self.model = DenseModel(self.spec, files.ckpt, files.names, self.dtype, self.device, self.max_model_len)
        self.cache = KVCache(self.spec, max_num_seqs, self.max_model_len, self.dtype, self.device)
        self.scheduler = Scheduler(max_num_seqs, max(max_num_batched_tokens, 1), max_queue)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(files.ckpt.path)
        self.eos_ids = set(self.spec.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.generation_defaults, gen_eos = generation_config(files.ckpt.path)
        self.eos_ids.update(gen_eos)
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.pipeline_min_tokens = pipeline_min_tokens
        self.micro_batches = micro_batches  # with a remote dispatcher, a big enough step is cut into this many
        self.validator = Validator(self.spec.vocab_size, self.max_model_len, limits)
        self.retry_backoff_s = retry_backoff_s
        self.step_retries = 0  # attempts repeated after ExpertsUnavailable
        self.failed_requests = 0  # requests ended by a failure (RequestFailed)

    def set_limits(self, limits: RequestLimits) -> None:
        """Request size limits (e.g. from `AppArgs.limits`), checked at admission."""
        self.validator = Validator(self.spec.vocab_size, self.max_model_len, limits)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field for an unusable prompt or parameters (any thread)."""
        self.validator.request(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; raises InvalidRequest or QueueFull (nothing is queued then)."""
        if request_id in self.seqs:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        self.validate(prompt_ids, params)
        detok = Detokenizer(self.tokenizer, params.stop, prompt_context(self.tokenizer, prompt_ids))
        seq = Sequence(request_id, list(prompt_ids), params, detok=detok)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq  # first: abort(request_id) finds it from here on, queued or not
        try:
            self.scheduler.add(seq)
        except BaseException:  # QueueFull, or Ctrl-C as it was queued: nothing is left behind
            self.abort(request_id)
            raise
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV-cache slot at once."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self._release(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one engine step; returns the sequences that got a new token or ended (finished ones included).

        A failure ends only the requests it belongs to (Sequence.error is set): a step whose experts were
        unavailable is retried with backoff (KV writes are keyed by position, so a step can be repeated),
        then each sequence is run alone; one that failed for its size (a shard out of memory for its tokens) is
        run in halves at once; a row that cannot be sampled ends its own request.
        """
        work = self.scheduler.schedule()
        if not work:
            return []
        hidden, work, out = self._forward(work)  # hidden [N, H] for the surviving work
        self.steps += 1
        for s, n in work:
            s.num_cached += n
        ready = [(i, s) for i, (s, n) in enumerate(work) if s.num_cached == s.num_tokens]
        if ready:
            rows = torch.tensor([i for i, _ in ready], device=self.device)
            seqs = [s for _, s in ready]
            try:
                sampled = self._sample(hidden[rows], seqs)
            except BaseException:  # no row drew: the step did not happen (the scheduler would never run these again)
                for s, n in work:
                    s.num_cached -= n
                raise
            for s, tok, lp, err in zip(seqs, *sampled):
                try:
                    if err is not None:
                        raise err
                    self._append(s, tok, lp)
                except Exception as e:  # noqa: BLE001 - this row's request only
                    self.fail(s, e)
            out += seqs
        return out

    def _chunks(self, work: list[tuple[Sequence, int]]) -> list[tuple[int, int, list[int]]]:
        return [(s.slot, s.num_cached, [s.token(i) for i in range(s.num_cached, s.num_cached + n)]) for s, n in work]

    def _begin(self) -> None:
        begin = getattr(self.dispatcher, "begin_step", None)
        if begin is not None:
            begin()

    def _forward(self, work: list[tuple[Sequence, int]]
                 ) -> tuple[torch.Tensor, list[tuple[Sequence, int]], list[Sequence]]:
        """(hidden [N, H], the work it is for, the sequences that failed) for this step's work."""
        chunks, error = self._chunks(work), None
        for attempt in range(len(self.retry_backoff_s) + 1):
            self._begin()
            try:
                return self._run(chunks), work, []
            except ExpertsUnavailable as e:  # transient: all copies of some experts failed this step
                error = e
                if e.for_its_size:  # out of memory for these tokens: the same step would fail the same way
                    log.warning("step failed (%s); running its %d sequences in halves", e, len(work))
                    return self._halve(work, e)
                if attempt < len(self.retry_backoff_s):
                    log.warning("step failed (%s); retry %d in %.2fs", e, attempt + 1, self.retry_backoff_s[attempt])
                    self.step_retries += 1
                    time.sleep(self.retry_backoff_s[attempt])
            except Exception as e:  # noqa: BLE001 - not transient: find the sequences it belongs to
                log.exception("step failed; running its %d sequences one by one", len(work))
                error = e
                break
        log.warning("step failed after retries (%s); running its %d sequences one by one", error, len(work))
        return self._isolate(work)

    def _isolate(self, work: list[tuple[Sequence, int]]
                 ) -> tuple[torch.Tensor, list[tuple[Sequence, int]], list[Sequence]]:
        """Run each sequence's part of the step alone; end only those that still fail."""
        kept, rows, failed = [], [], []
        for s, n in work:
            self._begin()
            try:
                rows.append(self._run(self._chunks([(s, n)])))
                kept.append((s, n))
            except Exception as e:  # noqa: BLE001 - this sequence only
                self.fail(s, e)
                failed.append(s)
        return self._rows(rows), kept, failed

    def _halve(self, work: list[tuple[Sequence, int]], error: Exception
               ) -> tuple[torch.Tensor, list[tuple[Sequence, int]], list[Sequence]]:
        """The work of a step that failed for its size (`error`), in two runs of about half its tokens each (cut at
        sequence boundaries, so a long prompt's chunk runs apart from the rest); a run that fails too is halved in
        turn, and a sequence that fails alone ends. One request too large among N costs about 2 log2 N runs."""
        if len(work) == 1:
            self.fail(work[0][0], error)
            return self._rows([]), [], [work[0][0]]
        rows, kept, failed = [], [], []
        for a, b in split_even([n for _, n in work], 2):
            part = work[a:b]
            self._begin()
            try:
                hidden, part_kept, part_failed = self._run(self._chunks(part)), part, []
            except Exception as e:  # noqa: BLE001 - this part only: smaller still
                hidden, part_kept, part_failed = self._halve(part, e)
            rows.append(hidden)
            kept += part_kept
            failed += part_failed
        return self._rows(rows), kept, failed

    def _rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The hidden rows [N, H] of the runs that succeeded, in order (none: [0, H])."""
        parts = [p for p in parts if p.shape[0]]
        return torch.cat(parts) if parts else torch.empty(0, self.spec.hidden_size, device=self.device)

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[list[int | None], list[TokenLogprob | None], list[Exception | None]]:
        """hidden [R, H] of the sequences whose last token ran -> (tokens, logprobs, per-row errors). Should the
        batch fail after some rows drew, their generators are rewound before the rows are sampled one by one."""
        states = [(s.generator, s.generator.get_state()) for s in seqs if s.generator is not None]
        try:
            return sample(self.model.logits(hidden), [s.params for s in seqs], [s.generator for s in seqs],
                          [self._context(s) for s in seqs])
        except Exception:  # noqa: BLE001 - find the row it belongs to
            log.exception("sampling failed; sampling its %d rows one by one", len(seqs))
        for g, state in states:
            g.set_state(state)
        out: tuple[list, list, list] = ([], [], [])
        for i, s in enumerate(seqs):
            try:
                tok, lp, err = sample(self.model.logits(hidden[i:i + 1]), [s.params], [s.generator], [self._context(s)])
                row = (tok[0], lp[0], err[0])
            except Exception as e:  # noqa: BLE001 - this row only
                row = (None, None, e)
            for acc, v in zip(out, row):
                acc.append(v)
        return out

    def _context(self, seq: Sequence) -> RowContext | None:
        """The penalties' view of a sequence; EOS and stop_token_ids banned while it is under min_tokens."""
        p = seq.params
        if not p.processes_logits:
            return None
        early = len(seq.output_ids) < p.min_tokens
        banned = tuple(sorted(((set() if p.ignore_eos else self.eos_ids) | set(p.stop_token_ids)))) if early else ()
        return RowContext(seq.prompt_ids, seq.output_ids, banned, seq.penalty)

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
            return self.model.forward(build_batch(chunks, self.device), self.cache, self.dispatcher)
        parts = [build_batch(chunks[a:b], self.device) for a, b in split_even(sizes, n)]  # at sequence boundaries
        return torch.cat(self.model.forward_pipelined(parts, self.cache, self.dispatcher))

    def _append(self, seq: Sequence, token: int, logprob) -> None:
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
            self._finish(seq, "stop")
        elif eos:
            self._finish(seq, "eos")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """End this request only: the client gets UNAVAILABLE / HTTP 503, never the raw internal error."""
        if isinstance(error, ExpertsUnavailable):  # its `public` cause where it has one (e.g. a message limit)
            msg = error.public or "some experts are unavailable (every copy failed); retry later"
        else:
            msg = "the request could not be served (its part of an engine step failed); retry later"
            log.error("request %s failed: %r", seq.request_id, error)
        seq.error = RequestFailed(msg)
        seq.error.__cause__ = error
        self.failed_requests += 1
        self._release(seq, "abort")
        self.seqs.pop(seq.request_id, None)

    def _release(self, seq: Sequence, reason: str) -> None:
        """End a request that did not finish by itself; the K/V it wrote are zeroed, as they may hold the NaN
        or inf of a numerical fault that the next request in its slot would read (masked, yet summed)."""
        if seq.status is Status.RUNNING:
            self.cache.clear(seq.slot, min(seq.num_tokens, self.cache.max_len))
        self.scheduler.finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        self.detokenize(seq)

    def detokenize(self, seq: Sequence) -> str:
        """Completion text so far (cut before a stop string, once one appears); O(text), see `text_delta`."""
        seq.detok.update(seq.text_ids, search=False)  # stop strings were looked for as each token came
        seq.text = seq.detok.text
        return seq.text

    def text_delta(self, seq: Sequence) -> str:
        """The text of `seq` not handed out yet that can no longer change (all the rest once it finished);
        costs a decode of a few recent tokens, whatever the length."""
        seq.detok.update(seq.text_ids, search=False)
        return seq.detok.delta(final=seq.finished)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One full forward of token_ids in a free slot, no sampling: logits [T, V] float32. The slot's K/V are
        zeroed after it, as `_release` does: a NaN of a numerical fault would poison the slot's next request."""
        if not self.scheduler.free_slots:
            raise RuntimeError("no free KV-cache slot")
        slot = self.scheduler.free_slots[-1]
        batch = build_batch([(slot, 0, list(token_ids))], self.device)
        try:
            hidden = self.model.forward(batch, self.cache, self.dispatcher, all_tokens=True)
            return self.model.logits(hidden)
        finally:
            self.cache.clear(slot, min(len(token_ids), self.cache.max_len))
