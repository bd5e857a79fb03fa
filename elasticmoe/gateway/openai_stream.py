"""The OpenAI response shapes, and running a request's n choices: streamed (merged server-sent events) or not."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from elasticmoe.engine.sampling import TokenLogprob
from elasticmoe.gateway.openai_protocol import ApiError
from elasticmoe.gateway.openai_shapes import FINISH_REASONS, chat_logprobs, completion_logprobs
from elasticmoe.gateway.request_stream import Update

log = logging.getLogger(__name__)

# A "gen" below is an openai_choices.Generation: one choice in the engine (start, rest, record, close, params, id).


class Shape:
    """The OpenAI response shapes of one endpoint (completions or chat)."""

    def __init__(self, chat: bool, tokenizer: Any, logprobs: bool, index: int = 0, as_ids: bool = False,
                 echo: str = "", first: bool = True):
        self.chat, self.tokenizer, self.logprobs, self.offset = chat, tokenizer, logprobs, 0
        self.index, self.as_ids = index, as_ids  # as_ids: logprob tokens as "token_id:<id>" (vLLM's extension)
        self.echo = echo  # completions' echo: the prompt's text, put before the choice's first text
        self.first = first  # the first choice of its prompt: its prompt tokens count in the usage

    def object(self, stream: bool) -> str:
        return ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"

    def choice(self, text: str, lps: list[TokenLogprob], finish: str | None, stream: bool) -> dict:
        c: dict[str, Any] = {"index": self.index}
        if not self.chat:
            c["text"], self.echo = self.echo + text, ""
        elif stream:
            c["delta"] = {"content": text} if text else {}
        else:
            c["message"] = {"role": "assistant", "content": text}
        c["logprobs"] = None
        if self.logprobs and self.chat:
            c["logprobs"] = chat_logprobs(self.tokenizer, lps, self.as_ids)
        elif self.logprobs:
            c["logprobs"], self.offset = completion_logprobs(self.tokenizer, lps, self.offset, self.as_ids)
        c["finish_reason"] = finish
        return c


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _chain(first: Update, rest: AsyncIterator[Update]) -> AsyncIterator[Update]:
    yield first
    async for u in rest:
        yield u


async def _indexed(i: int, gen: Any, first: Update) -> AsyncIterator[tuple[int, Update]]:
    async for u in _chain(first, gen.rest()):
        yield i, u


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Items of several async iterators as they come (one iterator: itself); closing it stops them all."""
    if len(streams) == 1:
        async for x in streams[0]:
            yield x
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(it: AsyncIterator[Any]) -> None:
        try:
            async for x in it:
                await queue.put(x)
            await queue.put(done)
        except Exception as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(it)) for it in streams]
    try:
        left = len(tasks)
        while left:
            x = await queue.get()
            if x is done:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(shapes: list[Shape], updates: list[Update], completion_tokens: list[int]) -> dict:
    """Usage of a request: each prompt's tokens once (however many its choices), every choice's tokens; of the
    prompt tokens, those its first choices took from the prefix cache (OpenAI's prompt_tokens_details)."""
    prompt_tokens = sum(u.prompt_tokens for s, u in zip(shapes, updates) if s.first)
    cached = sum(u.cached_tokens for s, u in zip(shapes, updates) if s.first)
    done = sum(completion_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def sse(gens: list[Any], shapes: list[Shape], firsts: list[Update], include_usage: bool,
               continuous: bool = False) -> AsyncIterator[str]:
    """The server-sent events of a streamed request (n choices); closing it (client gone) aborts them all.
    `continuous`: every chunk carries the usage so far (vLLM's stream_options.continuous_usage_stats)."""
    head, extra = gens[0], {"usage": None} if include_usage else {}
    counts = [f.completion_tokens for f in firsts]

    def chunk(choices: list[dict], **kw: Any) -> str:
        if continuous and "usage" not in kw:
            kw["usage"] = _usage(shapes, firsts, counts)
        return _event({"id": head.id, "object": shapes[0].object(True), "created": head.created, "model": head.model,
                       "choices": choices, **extra, **kw})

    lasts = list(firsts)
    merged = _merge([_indexed(i, g, f) for i, (g, f) in enumerate(zip(gens, firsts))])
    try:
        for shape in shapes:  # chat: each choice's role first; completions with echo: each one's prompt first
            if shape.chat:
                yield chunk([{"index": shape.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif shape.echo:
                yield chunk([shape.choice("", [], None, stream=True)])
        ended = 0  # choices whose last update came (merged yields the first updates too)
        async for i, last in merged:
            lasts[i], counts[i] = last, last.completion_tokens
            delta = last.delta  # the runner's detokenizer holds back partial characters and stop-string prefixes
            finish = FINISH_REASONS.get(last.finish_reason or "abort", "abort") if last.finished else None
            ended += last.finished
            event = chunk([shapes[i].choice(delta, list(last.logprobs), finish, stream=True)]) \
                if delta or finish or (shapes[i].logprobs and last.logprobs) else None  # built before counting ok
            if ended == len(gens):  # the request, once: every choice has ended (a client that leaves while its
                head.record(None, lasts[0])  # last events are written stays ok, as on gRPC and unstreamed)
            if event is not None:
                yield event
        head.record(None, lasts[0])  # recorded above already: every stream ends with its last update
        if include_usage:
            yield chunk([], usage=_usage(shapes, firsts, counts))
    except ApiError as e:
        yield _event(e.body())
    except Exception as e:  # noqa: BLE001 - a bug here mid-stream: logged, counted as the 500 it is (it was counted
        log.error("unhandled error in a streamed response", exc_info=e)  # as a client gone, below), and told
        yield _event(head.fail(ApiError(500, f"internal server error ({type(e).__name__})", "server_error")).body())
    finally:
        head.record(499)  # no-op unless the client went away mid-stream
        for g in gens:
            await g.close()
        await merged.aclose()  # its pumps (n > 1) stop now: a failed send leaves it at a yield, not ended
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A streamed request's response (`sse`): however it ends, even before its first event (the client gone while
    the response starts, the call cancelled), its choices are stopped and the request is counted (499)."""

    def __init__(self, events: AsyncIterator[str], gens: list[Any], headers: dict[str, str]):
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.gens = gens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # no-ops where sse already ended the choices; aclose frees their places without waiting
            self.gens[0].record(499)
            for g in self.gens:
                await g.close()
            await self.body_iterator.aclose()  # a failed send left sse at a yield (its n > 1 pumps running)


async def _complete(gen: Any, shape: Shape) -> tuple[dict, Update]:
    """Run one choice to the end: (its choice in the non-streamed body, its last update)."""
    try:
        u = await gen.start()
        lps = list(u.logprobs)
        async for u in gen.rest():
            lps += u.logprobs
    finally:
        await gen.close()
    finish = FINISH_REASONS.get(u.finish_reason or "abort", "abort")
    return shape.choice(u.text, lps, finish, stream=False), u


async def complete_all(gens: list[Any], shapes: list[Shape]) -> dict:
    """Run every choice at once and build the non-streamed response body; one that fails stops the others."""
    tasks = [asyncio.ensure_future(_complete(g, s)) for g, s in zip(gens, shapes)]
    try:
        done = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    head = gens[0]
    head.record(None, done[0][1])  # the request, once: every choice has ended
    return {"id": head.id, "object": shapes[0].object(False), "created": head.created, "model": head.model,
            "choices": [c for c, _ in done],
            "usage": _usage(shapes, [u for _, u in done], [u.completion_tokens for _, u in done])}


async def start_all(gens: list[Any]) -> list[Update]:
    """Start every choice; if one cannot start, or the wait is cancelled (the client went away), the others are
    stopped and its error raised."""
    try:
        got = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    except BaseException:
        for g in gens:
            await g.close()
        raise
    bad = next((r for r in got if isinstance(r, BaseException)), None)
    if bad is not None:
        for g in gens:
            await g.close()
        raise bad
    return list(got)
