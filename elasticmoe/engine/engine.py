"""The step loop: schedule, run the dense half (experts through a dispatcher), sample, detokenize, finish."""

from __future__ import annotations

from typing import Any

import torch

from elasticmoe.engine.checkpoint_defaults import eos_token_ids, generation_config, load_tokenizer
from elasticmoe.engine.detok import Detokenizer, prompt_context
from elasticmoe.engine.endings import Endings
from elasticmoe.engine.kv_space import make_cache
from elasticmoe.engine.prefix_cache import exact_for
from elasticmoe.engine.resume import Resume, check_resume, resume_sequence
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams, TokenLogprob
from elasticmoe.engine.scheduler import Scheduler, Sequence
from elasticmoe.engine.step_forward import RETRY_BACKOFF_S, StepForward, TokenBudget
from elasticmoe.engine.step_output import StepOutput, detokenize, text_delta
from elasticmoe.engine.validation import RequestLimits, Validator, clip
from elasticmoe.model import ModelFiles
from elasticmoe.model.batch import build_batch, to_device
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.dense_bytes import dense_bytes
from elasticmoe.model.dispatch import Dispatcher

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
__all__ = ["DTYPES", "RETRY_BACKOFF_S", "Engine"]


class Engine:
    """A continuous-batching engine over one DenseModel; experts run wherever the dispatcher sends them.
    prefix_caching: prompts share the cached KV blocks they start with (Scheduler), where that is exact: off for a
    model with linear-attention layers (prefix_cache.exact_for). A step's drawn rows are sampled, appended and
    finished by `output` (StepOutput)."""

    def __init__(self, files: ModelFiles, dispatcher: Dispatcher, *, dtype: str = "float32", device: str = "cpu",
                 max_num_seqs: int = 16, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 max_queue: int = 1024, tokenizer: Any = None, pipeline_min_tokens: int = 8,
                 micro_batches: int = 2, limits: RequestLimits | None = None,
                 retry_backoff_s: tuple[float, ...] = RETRY_BACKOFF_S, kv_cache_tokens: int | None = None,
                 kv_block_size: int = 16, prefix_caching: bool = True):
        self.files, self.spec = files, files.spec
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        limit = self.spec.max_position_embeddings  # config.json's, or what its rotary scaling allows (spec.py)
        if max_model_len is not None and max_model_len > limit:  # as vLLM: never a shorter context than asked for
            raise ValueError(f"max_model_len: {max_model_len} is more than the model's context length, {limit}; "
                             f"set max_model_len (served: limits.max_model_len) to at most {limit}")
        self.max_model_len = max_model_len or limit
        weights = dense_bytes(self.spec, files.ckpt, files.names, self.dtype, self.device, self.max_model_len)
        self.cache, pool = make_cache(self.spec, max_num_seqs, self.max_model_len, kv_cache_tokens, kv_block_size,
                                      self.dtype, self.device, weights)  # before the weights, checked with them
        self.model = DenseModel(self.spec, files.ckpt, files.names, self.dtype, self.device, self.max_model_len)
        self.scheduler = Scheduler(max_num_seqs, max(max_num_batched_tokens, 1), max_queue, pool,
                                   prefix_caching=prefix_caching and exact_for(self.spec, str(files.ckpt.path)))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(files.ckpt.path)
        self.generation_defaults, gen_eos = generation_config(files.ckpt.path)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        path = clip(str(files.ckpt.path))
        self.eos_ids = eos_token_ids([(f"{path}/config.json eos_token_id", self.spec.eos_token_ids),
                                      (f"{path} tokenizer's eos_token_id", [] if tok_eos is None else [tok_eos]),
                                      (f"{path}/generation_config.json eos_token_id", gen_eos)], self.spec.vocab_size)
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.forward = StepForward(self.model, self.cache, dispatcher, self.device, lambda s, e: self.fail(s, e),
                                   TokenBudget(max(max_num_batched_tokens, 1)), retry_backoff_s=retry_backoff_s,
                                   micro_batches=micro_batches, pipeline_min_tokens=pipeline_min_tokens)
        self.kv_cache_tokens = kv_cache_tokens  # None: room for max_num_seqs whole contexts
        self.validator = Validator(self.spec.vocab_size, self.max_model_len, limits, kv_cache_tokens)
        self.unreported: list[Sequence] = []  # ended by a step that then raised (take_unreported)
        self.endings = Endings(self.scheduler, self.cache, self.seqs)  # abort, fail; slots held back until zeroed
        self.scheduler.on_preempt = self.endings.preempt  # a preempted sequence's K/V zeroed as an abort's
        self.output = StepOutput(self.model, self.scheduler, self.endings, self.eos_ids, self.max_model_len)

    @property
    def held_slots(self) -> dict[int, int]:
        """slot -> positions to zero: zeroing failed as its request ended (its blocks are held too, by
        ("held", slot) in the pool, until they are zeroed); neither free nor running."""
        return self.endings.held

    @property
    def prefix_caching(self) -> bool:
        """Whether prompts share cached blocks (asked for, and exact for this model)."""
        return self.scheduler.prefix_caching

    @property
    def failed_requests(self) -> int:
        """Requests ended by a failure (RequestFailed)."""
        return self.endings.failed

    @property
    def dispatcher(self) -> Dispatcher:
        """Where the experts run (StepForward's; replacing it here replaces it there)."""
        return self.forward.dispatcher

    @dispatcher.setter
    def dispatcher(self, value: Dispatcher) -> None:
        self.forward.dispatcher = value

    @property
    def retry_backoff_s(self) -> tuple[float, ...]:
        """Sleeps between attempts of a step whose experts were unavailable (StepForward's)."""
        return self.forward.retry_backoff_s

    @retry_backoff_s.setter
    def retry_backoff_s(self, value: tuple[float, ...]) -> None:
        self.forward.retry_backoff_s = value

    @property
    def step_retries(self) -> int:
        """Attempts repeated after ExpertsUnavailable."""
        return self.forward.retries

    def set_limits(self, limits: RequestLimits) -> None:
        """Request size limits (e.g. from `AppArgs.limits`), checked at admission."""
        self.validator = Validator(self.spec.vocab_size, self.max_model_len, limits, self.kv_cache_tokens)

    def validate(self, prompt_ids: list[int], params: SamplingParams, resume: Resume | None = None) -> None:
        """Raise InvalidRequest naming the field for an unusable prompt, parameters or resume (any thread)."""
        self.validator.request(prompt_ids, params)
        if resume is not None:
            check_resume(resume, self.spec.vocab_size, params.max_tokens)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    resume: Resume | None = None) -> Sequence:
        """Queue a request; raises InvalidRequest, QueueFull, or RequestFailed (the tokenizer failed on the prompt's
        last tokens); nothing is queued then. `resume`: a broken stream's received tokens and text, taken as its
        outputs so far (resume.resume_sequence); admitted as a preempted sequence is, over prompt and outputs."""
        if request_id in self.seqs:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        self.validate(prompt_ids, params, resume)
        try:
            skip = params.skip_special_tokens
            detok = Detokenizer(self.tokenizer, params.stop, prompt_context(self.tokenizer, prompt_ids, skip), skip)
        except Exception as e:  # noqa: BLE001 - this request's failure, told as any other's (not a raw error)
            raise self.endings.failure(request_id, e) from e
        seq = Sequence(request_id, list(prompt_ids), params, detok=detok)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if resume is not None and resume.token_ids:
            try:
                resume_sequence(seq, resume, self.eos_ids)
            except InvalidRequest:
                raise
            except Exception as e:  # noqa: BLE001 - the tokenizer failed on its tokens: as on the prompt's
                raise self.endings.failure(request_id, e) from e
        self.seqs[request_id] = seq  # first: abort(request_id) finds it from here on, queued or not
        try:
            self.scheduler.add(seq, held=len(self.held_slots))  # held slots are free by the next step
        except BaseException:  # QueueFull, or Ctrl-C as it was queued: nothing is left behind
            self.abort(request_id)
            raise
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV-cache slot at once (Endings.abort)."""
        self.endings.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one engine step; returns the sequences that got a new token or ended (finished ones included).

        A failure ends only the requests it belongs to (Sequence.error is set): a step whose experts were
        unavailable is retried with backoff (KV writes are keyed by position, so a step can be repeated),
        then each sequence is run alone; one that failed for its size (a shard out of memory for its tokens) is
        run in halves at once, a prefill chunk failing so alone in smaller pieces (the step budget lowered to the
        piece that fit, for a while); a row that cannot be sampled ends its own request.
        """
        self.endings.zero_held()
        work = self.scheduler.schedule(self.forward.budget.tokens())
        if not work:
            return []
        pool = self.scheduler.pool
        for seq in self.scheduler.running:  # a newly admitted one's blocks (sent with this step's indices), also one
            self.cache.table.assign(seq.slot, pool.blocks(seq))  # admitted by a step cut short; others: no change
        try:
            hidden, ran, out = self.forward(work)  # hidden [N, H] for the work that ran; out: the sequences it ended
        except BaseException:  # past some it ended (finished now: nothing else ends one in a step), unheard of else
            self.unreported += [seq for seq, _ in work if seq.finished]
            raise
        try:
            return out + self._advance(hidden, ran)
        except BaseException:  # ended, yet no caller would hear of them: take_unreported() gives them
            self.unreported += out
            raise

    def take_unreported(self) -> list[Sequence]:
        """The sequences a step ended (failed) or gave a token before raising, which its caller never got; each is
        given once."""
        out, self.unreported = self.unreported, []
        return out

    def _advance(self, hidden: torch.Tensor, work: list[tuple[Sequence, int]]) -> list[Sequence]:
        """The step's work ran (hidden [N, H]): each sequence whose last token ran draws one; returns those. A row is
        counted cached only as its token is appended (or it is ended), so none is left counted-as-run with neither:
        should the draw raise (no row drew), none is (the scheduler runs these tokens again); should a row's own
        handling raise past its failure (a bug, Ctrl-C), the other rows go on and the step raises after them."""
        self.steps += 1
        ready = [(i, s, n) for i, (s, n) in enumerate(work) if s.num_cached + n == s.num_tokens]
        seqs = [s for _, s, _ in ready]
        sampled: tuple[list, list, list] = ([], [], [])
        if len(ready) == len(work):  # every row draws (decodes, last chunks): no index to send to the device
            sampled = self._sample(hidden, seqs)
        elif ready:
            sampled = self._sample(hidden[to_device([i for i, _, _ in ready], self.device)], seqs)  # [R, H]
        for s, n in work:
            if s.num_cached + n < s.num_tokens:  # a prefill chunk short of its last token: nothing to draw
                s.num_cached += n
        error: BaseException | None = None
        for (_, s, n), tok, lp, err in zip(ready, *sampled):
            try:
                self.output.row(s, n, tok, lp, err)
            except BaseException as e:  # noqa: BLE001 - re-raised once the other rows have their tokens
                error = error or e
        if error is not None:
            self.unreported += seqs  # the step raises: its caller hears of these rows from take_unreported()
            raise error
        return seqs

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]
                ) -> tuple[list[int | None], list[TokenLogprob | None], list[Exception | None]]:
        """The step's draw (StepOutput.sample): hidden [R, H] of seqs -> (tokens, logprobs, per-row errors)."""
        return self.output.sample(hidden, seqs)

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """End this request only: the client gets UNAVAILABLE / HTTP 503, never the raw internal error (Endings.fail;
        its slot zeroed, or held back until a step zeroes it)."""
        self.endings.fail(seq, error)

    def detokenize(self, seq: Sequence) -> str:
        """Completion text so far (cut before a stop string, once one appears); O(text), see `text_delta`."""
        return detokenize(seq)

    def text_delta(self, seq: Sequence) -> str:
        """The text of `seq` not handed out yet that can no longer change (all the rest once it finished);
        costs a decode of a few recent tokens, whatever the length."""
        return text_delta(seq)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One full forward of token_ids in a free slot, no sampling: logits [T, V] float32. The slot's K/V are
        zeroed after it, as an abort's are: a NaN of a numerical fault would poison the slot's next request (should
        the zeroing raise, the slot is held back, as there; slots held back are zeroed first, as a step does)."""
        self.endings.zero_held()
        if not self.scheduler.free_slots:
            raise RuntimeError("no free KV-cache slot")
        slot, pool = self.scheduler.free_slots[-1], self.scheduler.pool
        if not pool.reserve(owner := ("logits", slot), pool.blocks_for(len(token_ids))):
            raise RuntimeError(f"no room in the KV cache for {len(token_ids)} tokens: {pool.num_free} of its "
                               f"{pool.num_blocks} blocks of {pool.block_size} are free")
        try:
            self.cache.table.assign(slot, pool.blocks(owner))
            batch = build_batch([(slot, 0, list(token_ids))], self.device, self.cache.table)
            hidden = self.model.forward(batch, self.cache, self.dispatcher, all_tokens=True)
            return self.model.logits(hidden)
        finally:
            self.endings.zero(slot, min(len(token_ids), self.cache.max_len), owner)
            pool.release(owner)

