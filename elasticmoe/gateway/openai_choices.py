"""One OpenAI request in the engine: its choices (a Generation each, one Tally of metrics for them all), answered
whole or streamed, and aborted if the client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from elasticmoe.config import served_name
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams
from elasticmoe.engine.scheduler import QueueFull, RequestFailed
from elasticmoe.gateway.openai_protocol import ApiError, BaseRequest, choice_params
from elasticmoe.gateway.openai_stream import EventStream, Shape, complete_all, sse, start_all
from elasticmoe.gateway.request_stream import Update

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATUS_OF = {400: "invalid", 401: "unauthenticated", 404: "invalid", 413: "invalid", 429: "rejected",
             499: "cancelled", 503: "rejected"}  # else "error"; 499: the client went away (not a server error)


def record_outcome(core: Any, http_status: int | None, tally: Tally | None = None) -> None:
    """Count one finished request (all its choices) on core.metrics (if any): ok with latencies (TTFT to the first
    token of any choice, TPOT per choice over its own tokens), or failed with its code (and its TTFT if a token came
    before the failure, as the gRPC door counts it)."""
    m = getattr(core, "metrics", None)
    if m is None:
        return
    if http_status is not None:
        m.request("http", STATUS_OF.get(http_status, "error"))
        m.error(str(http_status))
        if tally is not None and tally.t_first:
            m.ttft(tally.t_first - tally.t0)
        return
    m.request("http", "ok")
    if tally is not None:
        m.ttft(tally.t_first - tally.t0)
        m.e2e(time.perf_counter() - tally.t0)
        for t_first, t_last, tokens in tally.choices:
            if tokens > 1:
                m.tpot((t_last - t_first) / (tokens - 1))


def bad_request(e: InvalidRequest, aliases: dict[str, str]) -> ApiError:
    """A 400 naming the field (as the API calls it) in param and message, with the error's code."""
    param = aliases.get(e.field, e.field)
    return ApiError(400, f"{param}: {getattr(e, 'message', e)}", param=param, code=getattr(e, "code", "invalid_value"))


def unavailable(message: str) -> ApiError:
    """A 503 as OpenAI answers one for a model short of capacity (retry later): type service_unavailable_error,
    code server_is_overloaded."""
    return ApiError(503, message, "service_unavailable_error", code="server_is_overloaded")


def _server_error(e: Exception) -> ApiError:
    """A request the engine ended: 503 (retry later) when it could not be served, 500 only for a bug here."""
    if isinstance(e, RequestFailed):
        return unavailable(str(e))
    log.error("request failed on a server error", exc_info=e)
    return ApiError(500, f"internal server error ({type(e).__name__})", "server_error")


class Tally:
    """One client request's metrics, shared by its n choices: recorded once, by the first outcome reported (an
    error, a disconnect, or the whole response done); its first token is the first of any choice, and each choice
    that ended gives its own TPOT (its first token to its last, over its own tokens)."""

    def __init__(self, core: Any, t0: float | None = None):
        self.core, self.t0, self.t_first, self.done = core, time.perf_counter() if t0 is None else t0, 0.0, False
        self.choices: list[tuple[float, float, int]] = []  # (its first token, its last, its tokens) per ended choice

    def first_token(self) -> float:
        now = time.perf_counter()
        self.t_first = self.t_first or now
        return now

    def choice_ended(self, t_first: float, tokens: int) -> None:
        self.choices.append((t_first, time.perf_counter(), tokens))

    def record(self, http_status: int | None, last: Update | None = None) -> None:
        """The outcome: an HTTP status, or None (ok: `last`, an update of the request, given once all ended)."""
        if not self.done:
            self.done = True
            record_outcome(self.core, http_status, self if last is not None or http_status is not None else None)


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
        self.t_first = 0.0  # when its first token came (time.perf_counter())

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
            raise self.fail(unavailable(f"the model is not ready: {e}")) from e
        except RequestFailed as e:  # the gateway stopped meanwhile
            raise self.fail(unavailable(str(e))) from e
        try:
            self._stream = self.core.runner.generate(self.id, self.ids, self.params, group=self.tally)
            first = await self._stream.__anext__()
        except InvalidRequest as e:  # counted once per request, however many of its choices are refused
            raise self.fail(bad_request(e, self.aliases)) from e
        except QueueFull as e:
            raise self.fail(ApiError(429, str(e), "requests", code="rate_limit_exceeded")) from e
        except Exception as e:  # noqa: BLE001 - the engine could not serve it
            raise self.fail(_server_error(e)) from e
        self.t_first = self.tally.first_token()
        if first.finished:
            self.tally.choice_ended(self.t_first, first.completion_tokens)
        return first

    async def rest(self) -> AsyncIterator[Update]:
        """The updates after the first one."""
        assert self._stream is not None
        try:
            async for u in self._stream:
                if u.finished:
                    self.tally.choice_ended(self.t_first, u.completion_tokens)
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


async def serve_choices(request: Request, req: BaseRequest, gens: list[Generation], shapes: list[Shape]) -> Any:
    request.state.tally = gens[0].tally  # for the 500 handler: a bug from here on counts once, in the request's Tally
    if not req.stream:
        return JSONResponse(await _unless_disconnected(request, complete_all(gens, shapes), gens[0]))
    firsts = await _unless_disconnected(request, start_all(gens), gens[0])
    opts = req.stream_options
    include_usage = bool(opts and (opts.include_usage or opts.continuous_usage_stats))
    return EventStream(sse(gens, shapes, firsts, include_usage, bool(opts and opts.continuous_usage_stats)), gens,
                       SSE_HEADERS)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids, sampling params, the API's names of the engine's fields (for its
    400s), and the text its choices start with (completions' echo)."""

    ids: list[int]
    params: SamplingParams
    aliases: dict[str, str] = field(default_factory=dict)
    echo: str = ""


def make_choices(core: Any, prefix: str, prompts: list[Prompt], req: BaseRequest, chat: bool, logprobs: bool,
                 t0: float | None = None) -> tuple[list[Generation], list[Shape]]:
    """One Generation and Shape per choice: n for each prompt, choice j of prompt i at index i * n + j (as OpenAI
    numbers them), sampling with seed + j when a seed is given (so each prompt's choices are those it gets sent
    alone). t0: when the request arrived (time.perf_counter(); default now)."""
    rid, tally, n = f"{prefix}-{uuid.uuid4().hex}", Tally(core, t0), req.n or 1
    gens, shapes = [], []
    for i, prompt in enumerate(prompts):
        for j, p in enumerate(choice_params(prompt.params, n)):
            gens.append(Generation(core, prefix, prompt.ids, p, prompt.aliases, response_id=rid, tally=tally))
            shapes.append(Shape(chat, core.tokenizer, logprobs, i * n + j, bool(req.return_tokens_as_token_ids),
                                prompt.echo, first=j == 0))
    return gens, shapes
