"""The Generation API's handlers over a GatewayCore: one implementation for Serve's proxy and the direct port."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from elasticmoe.gateway.auth import Unauthenticated
from elasticmoe.gateway.grpc_api import UnaryAnswer, parse_request, readable, response, resume_of, status_of
from elasticmoe.gateway.tokenizing import tokenized
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from elasticmoe.rpc.options import answer_bytes


def fail(metrics, ctx, e: BaseException) -> None:
    """Count a failed gRPC request and set its status. A call the client gave up (it cancelled, or its deadline
    passed: its handler cancelled, or its stream closed) counts as status cancelled, code CANCELLED, as HTTP counts
    a client that left (cancelled, 499); its status is left to gRPC. (Which of the two it was the server cannot
    tell: the client cancels the call as its deadline passes, a little before the server's own copy of it.)"""
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        metrics.request("grpc", "cancelled")
        metrics.error(grpc.StatusCode.CANCELLED.name)
        return
    if not isinstance(e, Exception):
        return
    code, details, status = status_of(e)
    metrics.request("grpc", status)
    metrics.error(code.name)
    if ctx is not None:
        ctx.set_code(code)
        ctx.set_details(details)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            ctx.set_trailing_metadata([("retry-after", "1")])


class _Timed:
    """Wraps a request's update stream: when it finishes, records TPOT and end-to-end latency and counts it ok
    (`done`); with `at_end` False, only once its caller calls `finish()` (a unary answer, once it is built)."""

    def __init__(self, stream, first, t0: float, metrics, at_end: bool = True):
        self.stream, self.t0, self.m, self.at_end = stream, t0, metrics, at_end
        self.first_at, self.n, self.ended, self.done = time.monotonic(), len(first.token_ids), first.finished, False
        if self.ended and at_end:
            self.finish()

    def __aiter__(self):
        return self

    async def __anext__(self):
        u = await self.stream.__anext__()
        self.n += len(u.token_ids)
        if u.finished and not self.ended:
            self.ended = True
            if self.at_end:
                self.finish()
        return u

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        if self.n > 1:
            self.m.tpot((now - self.first_at) / (self.n - 1))
        self.m.e2e(now - self.t0)
        self.m.request("grpc", "ok")

    async def aclose(self):
        await self.stream.aclose()


class GenerationService:
    """Generate / GenerateStream on a core (tokenizer, runner, metrics, api_keys, wait_ready).

    Errors set the gRPC status on the context (grpc_api.status_of) and are raised again, which is what both
    Serve's proxy and a grpc.aio server turn into that status. A call cancelled or failed at any point aborts
    its request, so its slot is freed at once.
    """

    def __init__(self, core):
        self.core = core
        self.max_answer_bytes = answer_bytes()  # a unary answer's (grpc_api.UnaryAnswer)

    async def start(self, request, grpc_context, at_end: bool = True):
        """Check the key, validate and admit (never waiting for an engine step), then wait for the first update;
        `at_end`: count the request ok as its last update comes (else: when the caller says, _Timed.finish), and a
        stream's: the request may resume a broken stream (GenerateRequest.resume; a unary one may not).

        Calls through a deployment handle carry no gRPC context: they come from inside the Ray cluster and are
        not checked for a key."""
        m, stream, t0 = self.core.metrics, None, time.monotonic()  # TTFT and latency from arrival, as HTTP's
        try:
            if grpc_context is not None:
                self.core.api_keys.check_grpc(grpc_context)
            request, engine = readable(request), self.core.runner.engine
            rid, ids, params = await tokenized(len(request.prompt), parse_request, request, self.core.tokenizer,
                                               engine.validator, getattr(engine, "generation_defaults", None))
            resume = resume_of(request, at_end, engine.validator.max_model_len)
            await self.core.wait_ready()
            stream = self.core.runner.generate(rid, ids, params, **({"resume": resume} if resume else {}))
            first = await stream.__anext__()
            m.ttft(time.monotonic() - t0)
            return rid, _Timed(stream, first, t0, m, at_end), first
        except BaseException as e:
            if stream is not None:
                await stream.aclose()
            fail(m, grpc_context, e)
            raise

    @contextlib.asynccontextmanager
    async def _ending(self, stream, grpc_context):
        """Around the rest of a started call: a failure counted, the stream closed, whatever ends it."""
        try:
            yield
        except BaseException as e:
            if not stream.done:  # not counted yet (a call cancelled after its last token was counted ok)
                fail(self.core.metrics, grpc_context, e)
            raise
        finally:
            await stream.aclose()

    async def generate(self, request, grpc_context=None):
        """One answer, held to max_answer_bytes (an answer past it: INVALID_ARGUMENT, the request aborted then)."""
        rid, stream, u = await self.start(request, grpc_context, at_end=False)
        answer = UnaryAnswer(self.max_answer_bytes)
        async with self._ending(stream, grpc_context):
            answer.add(u)
            async for u in stream:
                answer.add(u)
            reply = answer.response(rid, u)
            stream.finish()
        return reply

    async def generate_stream(self, request, grpc_context=None):
        rid, stream, u = await self.start(request, grpc_context)
        async with self._ending(stream, grpc_context):
            while True:  # u.delta: text that can no longer change (the engine's detokenizer), joined = unary text
                yield response(rid, u, u.delta, u.token_ids, u.logprobs)
                if u.finished:
                    return
                u = await stream.__anext__()


class GenerationServicer(gen_grpc.GenerationServicer):
    """The service as a grpc.aio servicer (the direct port; Serve's proxy calls the deployment instead)."""

    def __init__(self, service: GenerationService):
        self.service = service

    async def Generate(self, request, context):
        try:
            return await self.service.generate(request, context)
        except Exception:  # noqa: BLE001 - fail() set the status on the context
            await _abort(context)

    async def GenerateStream(self, request, context):
        try:  # closed at once when the call is cancelled (counted then, not when the generator is collected)
            async with contextlib.aclosing(self.service.generate_stream(request, context)) as responses:
                async for r in responses:
                    yield r
        except Exception:  # noqa: BLE001 - fail() set the status on the context
            await _abort(context)


class KeyFirst(grpc.aio.ServerInterceptor):
    """The API key of a call on a grpc.aio server (the direct port), checked on its metadata before gRPC reads its
    request: a call without a valid key ends UNAUTHENTICATED at once, counted as the handlers count it. Checked in the
    handler alone, a call waited for its request message first, holding one of the server's maximum_concurrent_rpcs
    places meanwhile: a client without a key opening calls that never sent one shut the port to every client."""

    def __init__(self, service: GenerationService):
        self.service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        try:
            self.service.core.api_keys.check_metadata(details.invocation_metadata)
        except Unauthenticated as e:
            return None if handler is None else _refusal(handler, self.service.core.metrics, e)
        return handler


def _refusal(handler, metrics, error: Unauthenticated):
    """A handler in place of `handler` ending its call UNAUTHENTICATED: it takes a request stream, never read, so no
    request message is awaited. (No such method, `handler` None: gRPC's own UNIMPLEMENTED.)"""

    async def refuse(_requests, context) -> None:
        fail(metrics, None, error)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


async def _abort(context) -> None:
    """End the call with the status fail() set: a handler's exception would make grpc.aio replace its details with
    "Unexpected <class ...>: " and the exception's own text (an INTERNAL error's raw message among them)."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:  # nothing set: a failure outside the service's handling
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
    await context.abort(code, context.details() or "")
