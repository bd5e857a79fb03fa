"""One request's updates on their way from the engine thread to its asyncio caller: Update and RequestStream."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Protocol

from elasticmoe.engine.sampling import TokenLogprob


class _Aborts(Protocol):
    def abort(self, key: str) -> None: ...


@dataclass(frozen=True)
class Update:
    """New tokens of one request since the last update (final=True once it finished)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    text: str  # the completion's whole text: on the final update only ("" before)
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    delta: str = ""  # new text that can no longer change (partial characters, stop-string prefixes held back);
    # the deltas of a request joined are its final text
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache (OpenAI's prompt_tokens_details.cached_tokens)


def _merge(old: Update, new: Update) -> Update:
    """Two updates the consumer has not read yet, as one (the stream's buffer never holds more)."""
    return Update(old.token_ids + new.token_ids, old.logprobs + new.logprobs, new.text, new.finished,
                  new.finish_reason, new.prompt_tokens, new.completion_tokens, old.delta + new.delta,
                  new.cached_tokens)


class RequestStream:
    """One request's updates for an asyncio caller. Bounded: the engine thread merges what the caller has not
    read yet into one pending Update, so a slow reader costs one buffer, never a queue. `aclose()` aborts."""

    def __init__(self, runner: _Aborts, key: str, loop: asyncio.AbstractEventLoop):
        self.runner, self.key, self.loop = runner, key, loop
        self._lock = threading.Lock()
        self._pending: Update | BaseException | None = None
        self._ready = asyncio.Event()
        self.done = False  # finished, failed or closed: nothing more will come
        self.sent = 0  # engine thread: output tokens already pushed

    def push(self, item: Update | BaseException) -> bool:
        """Engine thread: hand over an update or the request's error. False once the caller's event loop is closed:
        no one will read this stream or close it (the runner then aborts the request)."""
        if self.loop.is_closed():
            return False
        with self._lock:
            wake = self._pending is None
            old = self._pending
            if isinstance(old, BaseException):  # an error is the stream's last word
                return True
            self._pending = _merge(old, item) if isinstance(old, Update) and isinstance(item, Update) else item
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop closed meanwhile
                return False
        return True

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Update:
        while not self.done:
            with self._lock:
                item, self._pending = self._pending, None
                if item is None:
                    self._ready.clear()
            if item is None:
                await self._ready.wait()
                continue
            if isinstance(item, BaseException):
                self.done = True
                raise item
            self.done = item.finished
            return item
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the request if it is still running: its KV-cache slot is freed before the next step."""
        if not self.done:
            self.done = True
            self.runner.abort(self.key)
