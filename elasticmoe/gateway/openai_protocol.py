"""OpenAI API requests: errors, request models, sampling conversion and prompt token ids."""

from __future__ import annotations

import posixpath
from dataclasses import replace
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from elasticmoe.config import default_served_name, served_name
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams
from elasticmoe.engine.validation import INT32_MAX, SEED_RANGE, Validator, clip, short
from elasticmoe.gateway.openai_messages import ChatMessage, Tool, check_tools

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_N = 16  # choices per request: n, times the prompts of a /v1/completions request


class ApiError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def is_served(name: str, args: Any) -> bool:
    """`name` is the served name or an alias of it: the checkpoint as the server was given it (a path or hub id:
    vLLM, with no --served-model-name, serves under the path it was given), that path written another way (a
    trailing slash, ./), or the name it would be served under by default (a hub cache directory's org/name)."""
    if name == served_name(args):
        return True
    model = getattr(args, "model", None) or ""
    if not model or len(name) > 4096:
        return False
    if name in (model, default_served_name(model)):
        return True
    return "/" in name and posixpath.normpath(name) == posixpath.normpath(model)  # strings only: no file is read


def check_model(name: str | None, args: Any) -> None:
    """A request's `model`: the served name or an alias (is_served), or None (left out: the one model served, as
    vLLM takes it); any other is a 404 model_not_found, as OpenAI and vLLM answer it (never another model's answer
    under a name asked for)."""
    if name is not None and not is_served(name, args):
        raise ApiError(404, f"model: the model {short(name)} does not exist; this server serves "
                            f"{served_name(args)!r} (GET /v1/models)", param="model", code="model_not_found")


async def http_error(request: Any, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown path: 404, a wrong method: 405) in the OpenAI error shape; code null, as
    in OpenAI's own answer to an unknown URL ("Invalid URL (POST /v1/...)")."""
    where = f"({request.method} {clip(request.url.path)})"  # a URL may be as long as the server takes
    message = {404: f"Invalid URL {where}", 405: f"Method not allowed {where}"}.get(exc.status_code, exc.detail)
    out = ApiError(exc.status_code, str(message)).response()
    out.headers.update(exc.headers or {})  # e.g. 405's Allow
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk


class BaseRequest(BaseModel):
    """Fields common to both endpoints; unknown fields are rejected (400 naming the field). Strict: JSON types
    are not coerced (a string is no number, a bool no integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None  # the served name or an alias, or left out (check_model: any other is a 404)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM's): 0 or -1 = off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension
    user: str | None = None
    # OpenAI's bookkeeping fields, which change nothing in the tokens: accepted and ignored (store only off)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    # vLLM's documented extensions
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool | None = None  # logprob tokens as "token_id:<id>"
    skip_special_tokens: bool | None = None  # left out: true (special tokens add no text); false: their text is kept


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt, or several (a choice each, times n)
    logprobs: int | None = None
    echo: bool | None = None  # each choice's text starts with its prompt's (not with logprobs: see reject_unsupported)
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(BaseRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    # vLLM's: a new assistant turn (left out: true, but false with continue_final_message), or the final message
    # continued (a prefill: the prompt ends inside it); see openai_messages.generation_prompt
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more variables for the chat template


# Accepted only at their "off" values: field -> values that mean "off".
_OFF_VALUES: dict[str, tuple] = {
    "best_of": (None, 1), "suffix": (None, ""), "response_format": (None, {"type": "text"}),
    "store": (None, False),  # nothing is stored: a stored completion could never be retrieved
}


def _check_tools(req: ChatRequest) -> None:
    """Tool calls are not made: tool_choice "none" is served, with or without tools (they reach the chat template,
    as vLLM passes them, and the model answers in text); without tools "auto" means the same. Any other choice,
    or tools with tool_choice left out (OpenAI's default is then "auto"), is a 400 naming tool_choice. An empty
    tools array is a 400 naming tools (check_tools)."""
    check_tools(req.tools)
    choice = req.tool_choice
    if choice == "none" or (not req.tools and choice in (None, "auto")):
        return
    got = "left out, which with tools means 'auto'" if choice is None else f"got {short(choice)}"
    raise InvalidRequest("tool_choice", "this server makes no tool calls: only 'none' is supported (the model answers "
                                        f"in text; 'auto' too when no tools are given), {got}", "unsupported_value")


def reject_unsupported(req: BaseRequest) -> None:
    """Raise InvalidRequest for a known OpenAI field set to a value this server cannot honour."""
    for name, off in _OFF_VALUES.items():
        if name in type(req).model_fields and getattr(req, name) not in off:
            accepted = " or ".join(repr(v) for v in off[1:])
            raise InvalidRequest(name, f"only {accepted} is supported, got {short(getattr(req, name))}",
                                 "unsupported_value")
    if isinstance(req, ChatRequest):
        _check_tools(req)
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs", "requires logprobs: true")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise InvalidRequest("n", f"must be in [1, {MAX_N}], got {short(req.n)}")
    if isinstance(req, CompletionRequest):
        _check_completion(req)
    if req.stream_options is not None and not req.stream:  # as OpenAI and vLLM answer it
        raise InvalidRequest("stream_options", "only allowed with stream: true")


def _check_completion(req: CompletionRequest) -> None:
    """echo without logprobs (the prompt's own logprobs, which echo would add to them, are not computed here), and
    the prompts times n within MAX_N choices (each holds a place in the engine, as one of n does)."""
    if req.echo and req.logprobs is not None:
        raise InvalidRequest("echo", "echo with logprobs would answer the prompt tokens' logprobs, which this server "
                                     "does not compute: send echo without logprobs, or logprobs without echo",
                             "unsupported_value")
    prompts, n = len(prompt_list(req.prompt)), req.n or 1
    if prompts * n > MAX_N:
        raise InvalidRequest("prompt", f"{prompts} prompts x n {n} are {prompts * n} choices; the limit is {MAX_N} "
                                       "a request (send the prompts in several requests)")


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for k, v in (bias or {}).items():
        if not (k.isascii() and k.isdigit()):  # str.isdigit() alone admits e.g. "\u00b2", which int() refuses
            raise InvalidRequest("logit_bias", f"keys must be token ids, got {short(k)}")
        if len(k.lstrip("0")) > len(str(INT32_MAX)):  # int() refuses over 4,300 digits (a ValueError: was a 500)
            raise InvalidRequest("logit_bias", f"token id {short(k)} is outside [0, {INT32_MAX}]")
        out[int(k)] = v
    return out


def sampling_params(req: BaseRequest, max_tokens: int, logprobs: int | None,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    """The engine's SamplingParams (validated: InvalidRequest names the bad field). A field the request leaves
    unset takes the checkpoint's generation_config.json value in `defaults` (temperature, top_p, top_k,
    repetition_penalty, min_p), else the API's default."""
    d = defaults or {}

    def pick(name: str, default: Any) -> Any:
        v = getattr(req, name)
        return v if v is not None else d.get(name, default)

    stop = req.stop if req.stop is not None else ()
    return SamplingParams(
        max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
        top_k=pick("top_k", 0), seed=req.seed, stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=bool(req.ignore_eos), logprobs=logprobs, presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0, repetition_penalty=pick("repetition_penalty", 1.0),
        min_p=pick("min_p", 0.0), min_tokens=req.min_tokens or 0, stop_token_ids=tuple(req.stop_token_ids or ()),
        logit_bias=_logit_bias(req.logit_bias),
        skip_special_tokens=req.skip_special_tokens is not False)


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of each of n choices: choice i samples with seed + i (so n choices differ, and a request
    with a seed is reproducible); greedy choices are all the same."""
    if params.seed is None or n == 1:
        return [params] * n
    hi = SEED_RANGE[1]
    return [replace(params, seed=params.seed + i if params.seed + i < hi else params.seed - i) for i in range(n)]


def prompt_list(prompt: Any) -> list[Any]:
    """A completions `prompt` as its prompts, each a string or token ids: a string or one list of ids is one prompt;
    a list of strings or of id lists is as many ([] is one empty prompt, refused as one)."""
    if isinstance(prompt, str) or not prompt or not isinstance(prompt[0], (str, list)):
        return [prompt]
    return list(prompt)


def completion_ids(tokenizer: Any, prompt: Any, check: Validator) -> list[list[int]]:
    """Each prompt (text or token ids) as token ids; one of several named prompt[i] in an error."""
    prompts = prompt_list(prompt)
    out = []
    for i, p in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        out.append(check.encode(tokenizer, p, name) if isinstance(p, str) else check.prompt_ids(p, name))
    return out
