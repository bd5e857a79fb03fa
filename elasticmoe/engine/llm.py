"""The offline API, as vLLM users know it: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from elasticmoe.engine.engine import DTYPES, Engine
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams, TokenLogprob
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.engine.validation import Validator
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore


@dataclass(frozen=True)
class RequestOutput:
    """One finished completion."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos" (a request that failed raises instead)
    logprobs: list[TokenLogprob] | None
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (vLLM's RequestOutput.num_cached_tokens)


class LLM:
    """A whole MoE model in this process: dense half and every expert, joined by a LocalDispatcher."""

    def __init__(self, model: str | os.PathLike, device: str = "cpu", dtype: str = "float32", *, max_num_seqs: int = 16,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 2048, moe_backend: str = "auto",
                 kv_cache_tokens: int | None = None, kv_block_size: int = 16, prefix_caching: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len),
                            ("max_num_batched_tokens", max_num_batched_tokens), ("kv_cache_tokens", kv_cache_tokens),
                            ("kv_block_size", kv_block_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        self.files = open_model(model)
        spec = self.files.spec
        self.store = ExpertStore(self.files.ckpt, self.files.names, spec, DTYPES[dtype], torch.device(device),
                                 backend=moe_backend)
        self.engine = Engine(self.files, LocalDispatcher(self.store), dtype=dtype, device=device,
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                             max_num_batched_tokens=max_num_batched_tokens, max_queue=1 << 30,
                             kv_cache_tokens=kv_cache_tokens, kv_block_size=kv_block_size,
                             prefix_caching=prefix_caching)
        self.store.load((l, e) for l in spec.moe.moe_layers for e in range(spec.moe.num_experts))  # once it is valid
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def encode(self, prompt: str) -> list[int]:
        """Tokenize a prompt as the model's tokenizer does by default (BOS where it adds one)."""
        return self.tokenizer.encode(prompt)

    def get_default_sampling_params(self) -> SamplingParams:
        """As vLLM's: SamplingParams() with the checkpoint's generation_config.json values (temperature, top_p,
        top_k, repetition_penalty, min_p, and max_new_tokens as max_tokens) where it has them; what `generate`
        uses when given no params (there a max_tokens beyond the context left is cut to it, as in vLLM)."""
        return SamplingParams(**self.engine.generation_defaults)  # (a top_k of -1, "off", SamplingParams takes as 0)

    def generate(self, prompts: list[str] | list[list[int]] | str,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete every prompt (batched together, continuous batching); outputs in prompt order. Without
        sampling_params, each prompt gets `get_default_sampling_params()` (the checkpoint's defaults). A prompt
        the engine could not serve (e.g. NaN from its experts) raises RequestFailed naming it, once all ended."""
        prompts = self._prompt_list(prompts)
        params = sampling_params if sampling_params is not None else self.get_default_sampling_params()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"sampling_params: {len(plist)} given for {len(prompts)} prompts")
        ids = self._prompt_ids(prompts)
        check = self.engine.validator
        if sampling_params is None:  # the default max_tokens (the checkpoint's or 16) within the context left
            plist = [replace(p, max_tokens=check.default_max_tokens(len(t), p.max_tokens)) for p, t in zip(plist, ids)]
        for toks, p in zip(ids, plist):  # validate all before queueing any
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params: expected SamplingParams, got {type(p).__name__}")
            self.engine.validate(toks, p)
        seqs, rids = [], []
        try:
            for toks, p in zip(ids, plist):
                rids.append(f"offline-{self._next_id}")  # before it is queued: a Ctrl-C as it is finds it here
                self._next_id += 1
                seqs.append(self.engine.add_request(rids[-1], toks, p))
            while self.engine.has_work():
                self.engine.step()
        except BaseException:  # Ctrl-C, or a bug: no request of this call outlives it (nor holds its KV slot)
            for rid in rids:
                self.engine.abort(rid)
            raise
        failed = [(i, s) for i, s in enumerate(seqs) if s.error is not None]
        if failed:  # as vLLM's generate: an error, not an output that looks finished
            i, s = failed[0]
            cause = s.error.__cause__ or s.error
            more = f" ({len(failed)} of {len(seqs)} prompts failed)" if len(failed) > 1 else ""
            raise RequestFailed(f"prompt {i} ({s.request_id}) could not be served: {cause!r}{more}") from cause
        return [RequestOutput(s.request_id, s.prompt_ids, s.text, list(s.output_ids), s.finish_reason or "abort",
                              list(s.logprobs) if s.params.logprobs is not None else None, s.cached_tokens)
                for s in seqs]

    @staticmethod
    def _prompt_list(prompts: object) -> list:
        """`generate`'s prompts as a list of prompts: one str or list of token ids is one prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequest("prompts", f"must be a str, a list of token ids or a list of those, got "
                                            f"{type(prompts).__name__}")
        return list(prompts)

    def _prompt_ids(self, prompts: list) -> list[list[int]]:
        """Each prompt's token ids (text tokenized); a prompt of another type is named by its index."""
        check, out = self.engine.validator, []
        for i, p in enumerate(prompts):
            if isinstance(p, str):  # a text prompt over the token limit names `prompt`, as the gRPC door does
                out.append(check.prompt_ids(check.encode(self.tokenizer, p), "prompt"))
            elif isinstance(p, (list, tuple)):
                out.append(check.prompt_ids(p))
            else:
                raise InvalidRequest(f"prompts[{i}]", f"must be a str or a list of token ids, got {type(p).__name__}")
        return out

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """One full forward: logits [T, vocab] float32, for parity checks. T from 1 to max_model_len, ids in the
        vocabulary (else InvalidRequest naming token_ids)."""
        whole_context = Validator(self.engine.spec.vocab_size, self.engine.max_model_len + 1)  # no token to generate
        return self.engine.logits(whole_context.prompt_ids(token_ids, "token_ids"))
