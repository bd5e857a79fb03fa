"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE streaming) and /v1/models."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.config import served_name
from elasticmoe.engine.validation import RequestLimits, Validator
from elasticmoe.gateway.auth import RequireApiKey
from elasticmoe.gateway.openai_body import parse_body
from elasticmoe.gateway.openai_choices import Prompt, bad_request, make_choices, record_outcome, serve_choices
from elasticmoe.gateway.openai_extras import register_extra_routes
from elasticmoe.gateway.openai_field_errors import describe
from elasticmoe.gateway.openai_messages import chat_chars, chat_ids, generation_prompt
from elasticmoe.gateway.tokenizing import chars_of, parsed, tokenized
from elasticmoe.gateway.openai_protocol import (
    COMPLETION_MAX_TOKENS, ApiError, BaseRequest, ChatRequest, CompletionRequest, check_model,
    completion_ids, http_error, prompt_list, reject_unsupported, sampling_params)

log = logging.getLogger(__name__)


def _invalid(core: Any, e: InvalidRequest, aliases: dict[str, str]) -> ApiError:
    """InvalidRequest -> a 400 ApiError whose param (and message) use the API's field name; counted on core."""
    record_outcome(core, 400)
    return bad_request(e, aliases)


def _defaults(core: Any) -> dict | None:
    """The checkpoint's generation_config.json sampling defaults (vLLM's `--generation-config auto`)."""
    return getattr(getattr(core.runner, "engine", None), "generation_defaults", None)


def _validator(core: Any) -> Validator:
    engine = getattr(core.runner, "engine", None)
    return getattr(engine, "validator", None) or Validator(1 << 62, 1 << 62, RequestLimits())


async def read_request(request: Request, model: type[BaseRequest], core: Any) -> BaseRequest:
    """The body as `model`: 413 above max_body_bytes (read no further; code null: OpenAI documents none), 400
    naming the field otherwise, 404 for a model other than the served one, 499 when the client leaves before it
    has sent it all (counted as a client gone later is, not a server error)."""
    try:
        body = await _read(request, model, _validator(core))
        check_model(body.model, core.args)
        return body
    except InvalidRequest as e:
        raise _invalid(core, e, {}) from None
    except ApiError as e:
        record_outcome(core, e.status)
        raise


async def _read(request: Request, model: type[BaseRequest], check: Validator) -> BaseRequest:
    cap = check.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):  # '²'.isdigit() but int() refuses it
        raise ApiError(400, f"the Content-Length header is not a byte count: {length[:40]!r}", code="invalid_value")
    if length is not None and int(length) > cap:
        raise ApiError(413, f"the request body is over the limit of {cap} bytes", param=None)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, f"the request body is over the limit of {cap} bytes", param=None)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(499, "the client disconnected", "client_disconnected") from None
    raw = b"".join(chunks)
    return await parsed(len(raw), _parse, raw, model, check.limits.max_json_depth)


def _parse(raw: bytes, model: type[BaseRequest], max_depth: int) -> BaseRequest:
    """A body as `model` (ApiError or InvalidRequest naming the field if not); a large one runs off the loop."""
    obj = parse_body(raw, max_depth)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param, code = describe(e, model)
        raise ApiError(400, message, param=param, code=code) from None


def _prompts(tokenizer: Any, req: CompletionRequest, check: Validator) -> list[tuple[list[int], str]]:
    """Each prompt's token ids, and with echo its text (a string prompt as sent, token ids decoded as vLLM decodes
    them: tokenizer.decode, special tokens written)."""
    ids = completion_ids(tokenizer, req.prompt, check)
    if not req.echo:
        return [(i, "") for i in ids]
    return [(i, p if isinstance(p, str) else tokenizer.decode(i)) for i, p in zip(ids, prompt_list(req.prompt))]


def _completion_prompt(core: Any, req: CompletionRequest, check: Validator, ids: list[int], echo: str,
                       name: str) -> Prompt:
    """One prompt's Prompt: its max_tokens left out is OpenAI's 16 (generation_config's max_new_tokens or the
    context it leaves where less); `name`: the prompt's field (prompt, or prompt[i] of several)."""
    max_tokens = req.max_tokens
    if max_tokens is None:
        cap = min(COMPLETION_MAX_TOKENS, (_defaults(core) or {}).get("max_tokens", COMPLETION_MAX_TOKENS))
        max_tokens = check.default_max_tokens(len(ids), cap)
    params = sampling_params(req, max_tokens, req.logprobs, _defaults(core))
    return Prompt(ids, params, {"prompt_token_ids": name}, echo)


async def create_completion(core: Any, req: CompletionRequest, request: Request,
                            t0: float | None = None) -> Any:
    """POST /v1/completions; t0: when it arrived (time.perf_counter(); default now), where TTFT and latency start.
    Several prompts are one request: n choices each, numbered prompt by prompt."""
    try:
        reject_unsupported(req)
        check = _validator(core)
        got = await tokenized(chars_of(req.prompt), _prompts, core.tokenizer, req, check)
        prompts = [_completion_prompt(core, req, check, ids, echo, "prompt" if len(got) == 1 else f"prompt[{i}]")
                   for i, (ids, echo) in enumerate(got)]
    except InvalidRequest as e:
        raise _invalid(core, e, {"prompt_token_ids": "prompt"}) from e
    return await serve_choices(request, req, *make_choices(core, "cmpl", prompts, req, False,
                                                           req.logprobs is not None, t0))


async def create_chat_completion(core: Any, req: ChatRequest, request: Request,
                                 t0: float | None = None) -> Any:
    """POST /v1/chat/completions; t0 as for create_completion."""
    limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    aliases = {"prompt_token_ids": "messages", "prompt": "messages", "logprobs": "top_logprobs", "max_tokens": limit}
    try:
        reject_unsupported(req)
        check = _validator(core)
        add = generation_prompt(req.add_generation_prompt, req.continue_final_message)
        ids = await tokenized(chat_chars(req.messages, req.tools), chat_ids, core.tokenizer, req.messages, check, add,
                              req.tools, req.continue_final_message, req.chat_template_kwargs)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # OpenAI's default: as much as the context allows (generation_config's where less;
            # chat_ids refused a prompt that fills the context, naming messages)
            max_tokens = check.default_max_tokens(len(ids), (_defaults(core) or {}).get("max_tokens",
                                                                                        check.max_model_len))
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                 _defaults(core))
    except InvalidRequest as e:
        raise _invalid(core, e, aliases) from e
    return await serve_choices(request, req, *make_choices(core, "chatcmpl", [Prompt(ids, params, aliases)], req,
                                                           True, bool(req.logprobs), t0))


class ClientGone:
    """ASGI middleware: a client gone while its reply is written ends the call quietly. A spec 2.4 server fails that
    send with an OSError (Starlette's StreamingResponse raises it as ClientDisconnect), which reached the 500 handler
    and logged a traceback as a server bug; the request was already counted where it ended (ok, or 499), and no one
    is left to answer. Any other error passes on."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        failed = False

        async def sending(message: dict) -> None:
            nonlocal failed
            try:
                await send(message)
            except OSError:
                failed = True
                raise

        try:
            await self.app(scope, receive, sending)
        except (ClientDisconnect, OSError):
            if not failed:
                raise


def register_routes(app: FastAPI, get_core: Callable[[], Any]) -> FastAPI:
    """Add the OpenAI routes, the API-key check and error handlers to `app`; `get_core()` is resolved on every
    request. Only /health answers without a key (when keys are configured)."""
    created = int(time.time())

    def reject() -> None:
        try:
            record_outcome(get_core(), 401)
        except Exception:  # noqa: BLE001 - metrics never turn a 401 into a 500
            pass

    app.add_middleware(RequireApiKey, get_keys=lambda: getattr(get_core(), "api_keys", None), on_reject=reject)
    app.add_middleware(ClientGone)  # outside the key check: a 401 to a client gone is quiet too

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            record_outcome(get_core(), 400)
        except Exception:  # noqa: BLE001 - metrics never turn a 400 into a 500
            pass
        message, param, code = describe(exc)
        return ApiError(400, message, param=param, code=code).response()

    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        """A bug (an exception no handler expected): logged, and counted as the 500 it is (http error, code 500),
        once: a request whose choices recorded an outcome before the bug (request.state.tally) is not counted again."""
        log.error("unhandled error in the HTTP API", exc_info=exc)
        try:
            tally = getattr(request.state, "tally", None)
            if tally is not None:
                tally.record(500)  # a no-op where it ended before the bug
            else:
                record_outcome(get_core(), 500)
        except Exception:  # noqa: BLE001 - metrics never turn a 500 into another error
            log.exception("counting a 500 raised")
        return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error").response()

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)  # 404, 405
    app.add_exception_handler(Exception, on_bug)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    register_extra_routes(app, get_core, read_request)  # /version, /metrics, /tokenize, /detokenize

    def card() -> dict:
        return {"id": served_name(get_core().args), "object": "model", "created": created, "owned_by": "elasticmoe"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")  # a hub id holds a slash (the client sends it as %2F)
    async def retrieve_model(model: str) -> dict:
        check_model(model, get_core().args)
        return card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        t0, core = time.perf_counter(), get_core()  # arrival: TTFT and latency start here, as on gRPC
        body = await read_request(request, CompletionRequest, core)
        return await create_completion(core, body, request, t0)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        t0, core = time.perf_counter(), get_core()  # arrival: TTFT and latency start here, as on gRPC
        body = await read_request(request, ChatRequest, core)
        return await create_chat_completion(core, body, request, t0)

    return app


def build_openai_app(core: Any) -> FastAPI:
    """A standalone FastAPI app serving `core` (tests, or any ASGI server)."""
    # No /docs, /redoc or /openapi.json: the API is OpenAI's, documented there; nothing to show anonymous callers.
    return register_routes(FastAPI(title="elasticmoe", docs_url=None, redoc_url=None, openapi_url=None), lambda: core)
