"""The client gRPC API (`elasticmoe.v1.Generation`): request validation and response building."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import grpc

from elasticmoe.engine.resume import Resume
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams
from elasticmoe.engine.scheduler import QueueFull, RequestFailed
from elasticmoe.engine.validation import Validator
from elasticmoe.gateway.auth import Unauthenticated
from elasticmoe.gateway.request_stream import Update
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc.generation_wire import Malformed

log = logging.getLogger(__name__)
FINISH = {"length": gen.LENGTH, "stop": gen.STOP, "eos": gen.EOS, "abort": gen.ABORT}


def sampling_from_proto(s: gen.SamplingParams, defaults: dict | None = None) -> SamplingParams:
    """Proto SamplingParams -> engine SamplingParams. An unset field takes the checkpoint's generation_config.json
    value in `defaults` (temperature, top_p, top_k, repetition_penalty, min_p, max_new_tokens as max_tokens; as the
    HTTP door and `LLM.generate` do), else the proto's documented default; max_tokens the smaller of the two."""
    d = defaults or {}

    def opt(name: str, default):
        return getattr(s, name) if s.HasField(name) else d.get(name, default)

    return SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else min(16, d.get("max_tokens", 16)),
        temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0), top_k=opt("top_k", 0),
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), ignore_eos=opt("ignore_eos", False),
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        repetition_penalty=d.get("repetition_penalty", 1.0), min_p=d.get("min_p", 0.0),
    )


def readable(request: gen.GenerateRequest | Malformed) -> gen.GenerateRequest:
    """The request as the service's deserializer read it (generation_wire.read_request); InvalidRequest naming the
    field protobuf could not parse."""
    if isinstance(request, Malformed):
        raise InvalidRequest(request.field, request.message)
    return request


def parse_request(request: gen.GenerateRequest, tokenizer, validator: Validator | None = None,
                  defaults: dict | None = None) -> tuple[str, list[int], SamplingParams]:
    """(request_id, prompt token ids, params); raises InvalidRequest naming the field; `defaults`: the checkpoint's
    generation_config.json sampling values (Engine.generation_defaults) for the fields the request leaves unset.

    Sizes are checked before any work that grows with them (tokenizing, copying token ids).
    """
    check = validator or Validator(1 << 62, 1 << 62)
    rid = check.request_id(request.request_id)
    lim = check.limits
    if len(request.sampling.stop) > lim.max_stop_strings:
        raise InvalidRequest("stop", f"{len(request.sampling.stop)} stop strings; the limit is {lim.max_stop_strings}")
    logprobs = request.sampling.logprobs  # a uint32: past int32's range SamplingParams would name that range
    if request.sampling.HasField("logprobs") and logprobs > lim.max_logprobs:
        raise InvalidRequest("logprobs", f"must be in [0, {lim.max_logprobs}], got {logprobs}")
    has_text = request.HasField("prompt")
    has_ids = len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        raise InvalidRequest("prompt", "give exactly one of prompt or prompt_token_ids")
    if has_text:  # a text prompt over the token limit is named as the client sent it: prompt
        ids = check.prompt_ids(check.encode(tokenizer, request.prompt), "prompt")
    else:
        ids = check.prompt_ids(request.prompt_token_ids)
    params = sampling_from_proto(request.sampling, defaults)
    if not request.sampling.HasField("max_tokens"):  # the default, cut to the context left
        params = replace(params, max_tokens=check.default_max_tokens(len(ids), params.max_tokens))
    check.request(ids, params)
    return rid or uuid.uuid4().hex, ids, params


def resume_of(request: gen.GenerateRequest, streaming: bool, max_model_len: int) -> Resume | None:
    """The request's ResumeFrom as the engine's Resume (None: unset or empty, a new request); InvalidRequest naming
    resume on Generate (nothing of a unary answer was received), resume.token_ids past the context (before they are
    copied). The rest is the engine's to check (Engine.validate, add_request)."""
    r = request.resume if request.HasField("resume") else None
    if r is None or not (r.token_ids or r.text_chars):
        return None
    if not streaming:
        raise InvalidRequest("resume", "only GenerateStream resumes a stream (a Generate answer comes whole)")
    if len(r.token_ids) >= max_model_len:
        raise InvalidRequest("resume.token_ids", f"{len(r.token_ids)} tokens; the context length is {max_model_len}")
    return Resume(tuple(r.token_ids), r.text_chars)


def status_of(e: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(gRPC code, details, metrics status) of an exception raised while serving a request.

    A client's mistake is INVALID_ARGUMENT, a full gateway RESOURCE_EXHAUSTED, a request the cluster cannot
    serve now (shards not ready, experts unavailable) UNAVAILABLE; only a bug in this server is INTERNAL,
    and its raw message stays in the log.
    """
    if isinstance(e, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(e), "unauthenticated"
    if isinstance(e, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e), "invalid"
    if isinstance(e, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), "rejected"
    if isinstance(e, (RequestFailed, TimeoutError)):
        return grpc.StatusCode.UNAVAILABLE, str(e), "rejected"
    log.error("request failed on a server error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(e).__name__})", "error"


def response(request_id: str, u: Update, text: str, token_ids, logprobs) -> gen.GenerateResponse:
    """A GenerateResponse carrying `text` / `token_ids` (deltas when streaming) and usage; `logprobs` the engine's
    TokenLogprob or already the proto's."""
    msg = gen.GenerateResponse(
        request_id=request_id, text=text, token_ids=list(token_ids),
        finish_reason=FINISH.get(u.finish_reason or "", gen.FINISH_REASON_UNSPECIFIED),
        usage=gen.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                        cached_tokens=u.cached_tokens),
    )
    msg.logprobs.extend(lp if isinstance(lp, gen.TokenLogprob) else _logprob(lp) for lp in logprobs)
    return msg


def _logprob(lp) -> gen.TokenLogprob:
    return gen.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[gen.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def _varint_bytes(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


class UnaryAnswer:
    """A Generate answer gathered as its updates come, held to `limit` bytes (rpc.options.answer_bytes: what Serve's
    proxy sends, what gRPC clients take by default). Past it the proxy failed the call "Sent message larger than max"
    once the whole completion had run, naming no cause, counted ok. Now InvalidRequest names logprobs (max_tokens
    when there are none) and GenerateStream as the way out: as soon as a lower bound of the answer's size (each
    logprob entry's bytes, each token id's) passes the limit, so the request is aborted then, and at the end on the
    answer's exact size."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.token_ids: list[int] = []
        self.logprobs: list[gen.TokenLogprob] = []

    def add(self, u: Update) -> None:
        self.token_ids += u.token_ids
        self.size += sum(_varint_bytes(t) for t in u.token_ids)
        for lp in map(_logprob, u.logprobs):
            n = lp.ByteSize()
            self.size += 1 + _varint_bytes(n) + n  # its tag, length and bytes: exactly its share of the answer
            self.logprobs.append(lp)
        if self.size > self.limit:
            raise self._too_large(f"over {self.limit} bytes at {len(self.token_ids)} tokens")

    def response(self, request_id: str, u: Update) -> gen.GenerateResponse:
        msg = response(request_id, u, u.text, self.token_ids, self.logprobs)
        size = msg.ByteSize()
        if size > self.limit:
            raise self._too_large(f"{size} bytes for {len(self.token_ids)} tokens, over {self.limit}")
        return msg

    def _too_large(self, how: str) -> InvalidRequest:
        field, fewer = ("logprobs", "max_tokens or logprobs") if self.logprobs else ("max_tokens", "max_tokens")
        return InvalidRequest(field, f"the answer is {how}, the most bytes one Generate answer may take "
                                     f"(RAY_SERVE_GRPC_MAX_MESSAGE_SIZE); use GenerateStream (each message carries "
                                     f"a few tokens), or ask for fewer {fewer}")
