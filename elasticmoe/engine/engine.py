"""The step loop: schedule, run the dense half (experts through a dispatcher), sample, detokenize, finish."""

from __future__ import annotations

from typing import Any

import torch

from elasticmoe.engine.sampling import InvalidRequest, SamplingParams, sample
from elasticmoe.engine.scheduler import Scheduler, Sequence
from elasticmoe.model import ModelFiles
from elasticmoe.model.attention import KVCache
from elasticmoe.model.batch import build_batch
from elasticmoe.model.dense import DenseModel
from elasticmoe.model.dispatch import Dispatcher

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_tokenizer(path: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class Engine:
    """A continuous-batching engine over one DenseModel; experts run wherever the dispatcher sends them."""

    def __init__(self, files: ModelFiles, dispatcher: Dispatcher, *, dtype: str = "float32", device: str = "cpu",
                 max_num_seqs: int = 16, max_model_len: int | None = None, max_num_batched_tokens: int = 2048,
                 max_queue: int = 1024, tokenizer: Any = None, pipeline_min_tokens: int = 8):
        self.files, self.spec, self.dispatcher = files, files.spec, dispatcher
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.max_model_len = min(max_model_len or self.spec.max_position_embeddings, self.spec.max_position_embeddings)
        self.model = DenseModel(self.spec, files.ckpt, files.names, self.dtype, self.device, self.max_model_len)
        self.cache = KVCache(self.spec, max_num_seqs, self.max_model_len, self.dtype, self.device)
        self.scheduler = Scheduler(max_num_seqs, max(max_num_batched_tokens, 1), max_queue)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(files.ckpt.path)
        self.eos_ids = set(self.spec.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.pipeline_min_tokens = pipeline_min_tokens

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest naming the field for an unusable prompt or parameters."""
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequest("prompt_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {self.spec.vocab_size})")
        params.validate(self.max_model_len, len(prompt_ids))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Queue a request; raises InvalidRequest or QueueFull (nothing is queued then)."""
        if request_id in self.seqs:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        self.validate(prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        return seq

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV-cache slot at once."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Run one engine step; returns the sequences that got a new token (finished ones included)."""
        work = self.scheduler.schedule()
        if not work:
            return []
        begin = getattr(self.dispatcher, "begin_step", None)
        if begin is not None:
            begin()
        chunks = [(s.slot, s.num_cached, [s.token(i) for i in range(s.num_cached, s.num_cached + n)]) for s, n in work]
        hidden = self._run(chunks)  # [N, H]
        self.steps += 1
        for s, n in work:
            s.num_cached += n
        ready = [(i, s) for i, (s, n) in enumerate(work) if s.num_cached == s.num_tokens]
        if not ready:
            return []
        rows = torch.tensor([i for i, _ in ready], device=self.device)
        logits = self.model.logits(hidden[rows])  # [R, V]
        seqs = [s for _, s in ready]
        tokens, lps = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for s, tok, lp in zip(seqs, tokens, lps):
            self._append(s, tok, lp)
        return seqs

    def _run(self, chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """Forward the step; with a remote dispatcher and enough tokens, as two pipelined micro-batches."""
        tokens = sum(len(c[2]) for c in chunks)
        if not getattr(self.dispatcher, "remote", False) or len(chunks) < 2 or tokens < self.pipeline_min_tokens:
            return self.model.forward(build_batch(chunks, self.device), self.cache, self.dispatcher)
        half, acc = 1, 0
        for i, c in enumerate(chunks):  # split near half of the tokens, at a sequence boundary
            acc += len(c[2])
            if acc >= tokens / 2:
                half = max(1, min(i + 1, len(chunks) - 1))
                break
        parts = [build_batch(chunks[:half], self.device), build_batch(chunks[half:], self.device)]
        return torch.cat(self.model.forward_pipelined(parts, self.cache, self.dispatcher))

    def _append(self, seq: Sequence, token: int, logprob) -> None:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_at is None:
            import time

            seq.first_token_at = time.monotonic()
        p = seq.params
        if p.stop:
            self.detokenize(seq)
        if seq.stop_cut is not None:
            self._finish(seq, "stop")
        elif not p.ignore_eos and token in self.eos_ids:
            self._finish(seq, "eos")
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)
        self.detokenize(seq)

    def detokenize(self, seq: Sequence) -> str:
        """Completion text so far (cut before a stop string, once one appears)."""
        if seq.stop_cut is not None:
            return seq.text
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        for stop in seq.params.stop:
            at = text.find(stop)
            if at != -1 and (seq.stop_cut is None or at < seq.stop_cut):
                seq.stop_cut = at
        seq.text = text if seq.stop_cut is None else text[: seq.stop_cut]
        return seq.text

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One full forward of token_ids in a free slot, no sampling: logits [T, V] float32."""
        if not self.scheduler.free_slots:
            raise RuntimeError("no free KV-cache slot")
        slot = self.scheduler.free_slots[-1]
        batch = build_batch([(slot, 0, list(token_ids))], self.device)
        hidden = self.model.forward(batch, self.cache, self.dispatcher, all_tokens=True)
        return self.model.logits(hidden)
