"""The client gRPC API (`elasticmoe.v1.Generation`): request validation and response building."""

from __future__ import annotations

import uuid

from elasticmoe.engine.sampling import InvalidRequest, SamplingParams
from elasticmoe.gateway.runner import Update
from elasticmoe.rpc import generation_pb2 as gen

FINISH = {"length": gen.LENGTH, "stop": gen.STOP, "eos": gen.EOS, "abort": gen.ABORT}


def sampling_from_proto(s: gen.SamplingParams) -> SamplingParams:
    """Proto SamplingParams -> engine SamplingParams; unset fields take the documented defaults."""
    def opt(name: str, default):
        return getattr(s, name) if s.HasField(name) else default

    return SamplingParams(
        max_tokens=opt("max_tokens", 16), temperature=opt("temperature", 1.0), top_p=opt("top_p", 1.0),
        top_k=opt("top_k", 0), seed=opt("seed", None), stop=tuple(s.stop), ignore_eos=opt("ignore_eos", False),
        logprobs=opt("logprobs", None),
    )


def parse_request(request: gen.GenerateRequest, tokenizer) -> tuple[str, list[int], SamplingParams]:
    """(request_id, prompt token ids, params); raises InvalidRequest naming the field."""
    has_text = request.HasField("prompt")
    has_ids = len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        raise InvalidRequest("prompt", "give exactly one of prompt or prompt_token_ids")
    if has_text and not request.prompt:
        raise InvalidRequest("prompt", "the prompt is empty")
    ids = tokenizer.encode(request.prompt) if has_text else list(request.prompt_token_ids)
    params = sampling_from_proto(request.sampling)
    return request.request_id or uuid.uuid4().hex, ids, params


def response(request_id: str, u: Update, text: str, token_ids, logprobs) -> gen.GenerateResponse:
    """A GenerateResponse carrying `text` / `token_ids` (deltas when streaming) and usage."""
    msg = gen.GenerateResponse(
        request_id=request_id, text=text, token_ids=list(token_ids),
        finish_reason=FINISH.get(u.finish_reason or "", gen.FINISH_REASON_UNSPECIFIED),
        usage=gen.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens),
    )
    for lp in logprobs:
        msg.logprobs.append(gen.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                             top=[gen.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]))
    return msg
