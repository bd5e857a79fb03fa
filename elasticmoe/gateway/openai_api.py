"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE streaming) and /v1/models."""

from __future__ import annotations

import asyncio
import logging
import time
import types
import typing
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from elasticmoe.engine.sampling import InvalidRequest, SamplingParams
from elasticmoe.engine.scheduler import QueueFull, RequestFailed
from elasticmoe.config import served_name
from elasticmoe.engine.validation import RequestLimits, Validator
from elasticmoe.gateway.auth import RequireApiKey
from elasticmoe.gateway.openai_extras import register_extra_routes
from elasticmoe.gateway.openai_stream import EventStream, Shape, complete_all, sse, start_all
from elasticmoe.gateway.openai_protocol import (
    COMPLETION_MAX_TOKENS, ApiError, BaseRequest, ChatRequest, CompletionRequest, chat_ids, choice_params,
    completion_ids, http_error, parse_body, reject_unsupported, sampling_params)
from elasticmoe.gateway.runner import Update

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATUS_OF = {400: "invalid", 401: "unauthenticated", 413: "invalid", 429: "rejected", 503: "rejected"}  # else "error"; 499 = client went away


def _record(core: Any, http_status: int | None, last: Update | None = None, t0: float = 0.0,
            t_first: float = 0.0) -> None:
    """Count one finished request (all its choices) on core.metrics (if any): ok with latencies, or failed with
    its code."""
    m = getattr(core, "metrics", None)
    if m is None:
        return
    if http_status is not None:
        m.request("http", STATUS_OF.get(http_status, "error"))
        m.error(str(http_status))
        return
    m.request("http", "ok")
    if last is not None:
        now = time.perf_counter()
        m.ttft(t_first - t0)
        m.e2e(now - t0)
        if last.completion_tokens > 1:
            m.tpot((now - t_first) / (last.completion_tokens - 1))


def _invalid(core: Any, e: InvalidRequest, aliases: dict[str, str]) -> ApiError:
    """InvalidRequest -> a 400 ApiError whose param (and message) use the API's field name; counted on core."""
    _record(core, 400)
    return _bad_request(e, aliases)


def _bad_request(e: InvalidRequest, aliases: dict[str, str]) -> ApiError:
    param = aliases.get(e.field, e.field)
    return ApiError(400, f"{param}: {getattr(e, 'message', e)}", param=param)


def _server_error(e: Exception) -> ApiError:
    """A request the engine ended: 503 (retry later) when it could not be served, 500 only for a bug here."""
    if isinstance(e, RequestFailed):
        return ApiError(503, str(e), "service_unavailable")
    log.error("request failed on a server error", exc_info=e)
    return ApiError(500, f"internal server error ({type(e).__name__})", "server_error")


def _defaults(core: Any) -> dict | None:
    """The checkpoint's generation_config.json sampling defaults (vLLM's `--generation-config auto`)."""
    return getattr(getattr(core.runner, "engine", None), "generation_defaults", None)


def _validator(core: Any) -> Validator:
    engine = getattr(core.runner, "engine", None)
    return getattr(engine, "validator", None) or Validator(1 << 62, 1 << 62, RequestLimits())


async def read_request(request: Request, model: type[BaseRequest], core: Any) -> BaseRequest:
    """The body as `model`: 413 above max_body_bytes (read no further), 400 naming the field otherwise."""
    try:
        return await _read(request, model, _validator(core))
    except InvalidRequest as e:
        raise _invalid(core, e, {}) from None
    except ApiError as e:
        _record(core, e.status)
        raise


async def _read(request: Request, model: type[BaseRequest], check: Validator) -> BaseRequest:
    cap = check.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
        raise ApiError(413, f"the request body is over the limit of {cap} bytes", param=None)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"the request body is over the limit of {cap} bytes", param=None)
        chunks.append(chunk)
    obj = parse_body(b"".join(chunks), check.limits.max_json_depth)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        message, param = _describe(e, model)
        raise ApiError(400, message, param=param) from None


class Tally:
    """One client request's metrics, shared by its n choices: recorded once, by the first outcome reported (an
    error, a disconnect, or the whole response done); its first token is the first of any choice."""

    def __init__(self, core: Any):
        self.core, self.t0, self.t_first, self.done = core, time.perf_counter(), 0.0, False

    def first_token(self) -> None:
        self.t_first = self.t_first or time.perf_counter()

    def record(self, http_status: int | None, last: Update | None = None) -> None:
        if not self.done:
            self.done = True
            _record(self.core, http_status, last, self.t0, self.t_first)


class Generation:
    """One choice of a request in the engine: start (errors -> ApiError), its updates; metrics go to the
    request's Tally."""

    def __init__(self, core: Any, prefix: str, ids: list[int], params: SamplingParams, aliases: dict[str, str],
                 response_id: str | None = None, tally: Tally | None = None):
        self.core, self.ids, self.params, self.aliases = core, ids, params, aliases
        self.id, self.created = response_id or f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model = served_name(core.args)
        self.tally = tally or Tally(core)
        self._stream: AsyncIterator[Update] | None = None

    def record(self, http_status: int | None, last: Update | None = None) -> None:
        """The request's outcome (once per request, whichever choice reports first)."""
        self.tally.record(http_status, last)

    def fail(self, err: ApiError) -> ApiError:
        self.record(err.status)
        return err

    async def start(self) -> Update:
        """Wait for the expert shards, queue the request, and return its first update."""
        try:
            await self.core.wait_ready()
        except TimeoutError as e:
            raise self.fail(ApiError(503, f"the model is not ready: {e}", "service_unavailable")) from e
        try:
            self._stream = self.core.runner.generate(self.id, self.ids, self.params)
            first = await self._stream.__anext__()
        except InvalidRequest as e:  # counted once per request, however many of its choices are refused
            raise self.fail(_bad_request(e, self.aliases)) from e
        except QueueFull as e:
            raise self.fail(ApiError(429, str(e), "rate_limit_exceeded")) from e
        except Exception as e:  # noqa: BLE001 - the engine could not serve it
            raise self.fail(_server_error(e)) from e
        self.tally.first_token()
        return first

    async def rest(self) -> AsyncIterator[Update]:
        """The updates after the first one."""
        assert self._stream is not None
        try:
            async for u in self._stream:
                yield u
        except Exception as e:  # noqa: BLE001 - the engine could not serve it mid-generation
            raise self.fail(_server_error(e)) from e

    async def close(self) -> None:
        """Stop the engine stream (aborting the request if it is still running)."""
        if self._stream is not None:
            await self._stream.aclose()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (Serve's receive may raise instead of sending http.disconnect)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - the request was cancelled upstream: the client is gone
        return


async def _unless_disconnected(request: Request, coro: Any, gen: Generation) -> Any:
    """Await coro, cancelling it (so the engine aborts the request) if the client disconnects first."""
    task, watch = asyncio.ensure_future(coro), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # Serve cancels the call when the client goes away
        gen.record(499)
        raise
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if not task.cancelled():
        return task.result()
    gen.record(499)
    raise ApiError(499, "the client disconnected", "client_disconnected")


async def _serve(request: Request, req: BaseRequest, gens: list[Generation], shapes: list[Shape]) -> Any:
    if not req.stream:
        return JSONResponse(await _unless_disconnected(request, complete_all(gens, shapes), gens[0]))
    firsts = await _unless_disconnected(request, start_all(gens), gens[0])
    opts = req.stream_options
    include_usage = bool(opts and (opts.include_usage or opts.continuous_usage_stats))
    return EventStream(sse(gens, shapes, firsts, include_usage, bool(opts and opts.continuous_usage_stats)), gens,
                       SSE_HEADERS)


def _choices(core: Any, prefix: str, ids: list[int], params: SamplingParams, aliases: dict[str, str],
             req: BaseRequest, chat: bool, logprobs: bool) -> tuple[list[Generation], list[Shape]]:
    """One Generation and Shape per choice (n); choice i samples with seed + i when a seed is given."""
    rid, tally = f"{prefix}-{uuid.uuid4().hex}", Tally(core)
    gens, shapes = [], []
    for i, p in enumerate(choice_params(params, req.n or 1)):
        gens.append(Generation(core, prefix, ids, p, aliases, response_id=rid, tally=tally))
        shapes.append(Shape(chat, core.tokenizer, logprobs, i, bool(req.return_tokens_as_token_ids)))
    return gens, shapes


async def create_completion(core: Any, req: CompletionRequest, request: Request) -> Any:
    """POST /v1/completions."""
    aliases = {"prompt_token_ids": "prompt"}
    try:
        reject_unsupported(req)
        ids = completion_ids(core.tokenizer, req.prompt, _validator(core))
        max_tokens = req.max_tokens
        if max_tokens is None:  # OpenAI's 16; generation_config's max_new_tokens where less (vLLM)
            max_tokens = min(COMPLETION_MAX_TOKENS, (_defaults(core) or {}).get("max_tokens", COMPLETION_MAX_TOKENS))
        params = sampling_params(req, max_tokens, req.logprobs, _defaults(core))
    except InvalidRequest as e:
        raise _invalid(core, e, aliases) from e
    return await _serve(request, req, *_choices(core, "cmpl", ids, params, aliases, req, False,
                                                req.logprobs is not None))


async def create_chat_completion(core: Any, req: ChatRequest, request: Request) -> Any:
    """POST /v1/chat/completions."""
    limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    aliases = {"prompt_token_ids": "messages", "prompt": "messages", "logprobs": "top_logprobs", "max_tokens": limit}
    try:
        reject_unsupported(req)
        ids = chat_ids(core.tokenizer, req.messages, _validator(core))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:  # OpenAI's default: as much as the context allows
            context = getattr(core.runner.engine, "max_model_len", len(ids) + COMPLETION_MAX_TOKENS)
            if len(ids) >= context:
                raise InvalidRequest("messages", f"the prompt ({len(ids)} tokens) fills the context ({context})")
            max_tokens = min(context - len(ids), (_defaults(core) or {}).get("max_tokens", context))  # vLLM's
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                 _defaults(core))
    except InvalidRequest as e:
        raise _invalid(core, e, aliases) from e
    return await _serve(request, req, *_choices(core, "chatcmpl", ids, params, aliases, req, True, bool(req.logprobs)))


_KINDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("a boolean", "booleans")}


def _kind(tp: Any, plural: bool = False) -> str:
    """What a JSON value of type `tp` is, in words: "a list of strings"."""
    if typing.get_origin(tp) is list:
        return f"{'lists' if plural else 'a list'} of {_kind(typing.get_args(tp)[0], True)}"
    return _KINDS.get(tp, ("an object", "objects"))[plural]


def _union_at(model: Any, loc: tuple) -> tuple[int, tuple] | None:
    """Where `loc` (a pydantic error's) passes a union field of `model`: (its length up to the union, the union's
    types less None); pydantic puts the branch it tried (e.g. "str") next in the loc, which the client never wrote."""
    tp = model
    for i, part in enumerate(loc):
        args = tuple(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) > 1:
            return i, args
        if len(args) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = args[0]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part)
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return None


def _describe(exc: RequestValidationError | ValidationError, model: Any = None) -> tuple[str, str | None]:
    """(message, param) of the first pydantic error of a request body (a `model`)."""
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":  # the full path of a nested one: stream_options.foo
        param = ".".join(loc) or None
        return f"Unrecognized request argument supplied: {param}", param
    union = _union_at(model, tuple(err.get("loc", ()))) if model is not None else None
    if union is not None:  # stop: 5 -> "stop: must be a string or a list of strings", not "stop.str: ..."
        kinds = [_kind(t) for t in union[1]]
        return f"{'.'.join(loc[:union[0]])}: must be {', '.join(kinds[:-1])} or {kinds[-1]}", param
    return f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}", param


def register_routes(app: FastAPI, get_core: Callable[[], Any]) -> FastAPI:
    """Add the OpenAI routes, the API-key check and error handlers to `app`; `get_core()` is resolved on every
    request. Only /health answers without a key (when keys are configured)."""
    created = int(time.time())

    def reject() -> None:
        try:
            _record(get_core(), 401)
        except Exception:  # noqa: BLE001 - metrics never turn a 401 into a 500
            pass

    app.add_middleware(RequireApiKey, get_keys=lambda: getattr(get_core(), "api_keys", None), on_reject=reject)

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        try:
            _record(get_core(), 400)
        except Exception:  # noqa: BLE001 - metrics never turn a 400 into a 500
            pass
        message, param = _describe(exc)
        return ApiError(400, message, param=param).response()

    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in the HTTP API", exc_info=exc)
        return ApiError(500, f"internal server error ({type(exc).__name__})", "server_error").response()

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)  # 404, 405
    app.add_exception_handler(Exception, on_bug)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    register_extra_routes(app, get_core, read_request)  # /version, /metrics, /tokenize, /detokenize

    @app.get("/v1/models")
    async def list_models() -> dict:
        model = served_name(get_core().args)
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "elasticmoe"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        core = get_core()
        body = await read_request(request, CompletionRequest, core)
        return await create_completion(core, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        core = get_core()
        body = await read_request(request, ChatRequest, core)
        return await create_chat_completion(core, body, request)

    return app


def build_openai_app(core: Any) -> FastAPI:
    """A standalone FastAPI app serving `core` (tests, or any ASGI server)."""
    # No /docs, /redoc or /openapi.json: the API is OpenAI's, documented there; nothing to show anonymous callers.
    return register_routes(FastAPI(title="elasticmoe", docs_url=None, redoc_url=None, openapi_url=None), lambda: core)


def replica_core() -> Any:
    """`get_core` for a module-level app under `@serve.ingress`: the GatewayCore of this Serve replica."""
    from ray import serve

    return serve.get_replica_context().servable_object.core