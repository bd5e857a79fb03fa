"""Runs the engine's step loop in its own thread and streams each request's tokens to asyncio callers."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from elasticmoe.engine.engine import Engine
from elasticmoe.engine.sampling import SamplingParams, TokenLogprob
from elasticmoe.engine.scheduler import Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """New tokens of one request since the last update (final=True once it finished)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    text: str  # full completion text so far
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.q = loop, asyncio.Queue()
        self.sent = 0

    def push(self, item: Update | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.q.put_nowait, item)


class EngineRunner:
    """Owns an Engine; all engine calls happen on its thread. Thread-safe submit/abort from any event loop."""

    def __init__(self, engine: Engine, on_step: Callable[[float, int], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.last_step_at = time.monotonic()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def _call(self, fn: Callable, *args):
        """Run fn on the engine thread and return its result (or raise its exception)."""
        done = threading.Event()
        box: list = []

        def job():
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append((False, e))
            done.set()

        self._inbox.put(job)
        self._wake.set()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Update]:
        """Queue a request and yield its updates. Raises InvalidRequest / QueueFull before yielding.

        If the caller stops iterating (a cancelled call), the request is aborted and its KV cache freed.
        """
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        await loop.run_in_executor(None, self._call, self._add, request_id, prompt_ids, params, stream)
        finished = False
        try:
            while True:
                item = await stream.q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: _Stream) -> None:
        self.engine.add_request(request_id, prompt_ids, params)
        self._streams[request_id] = stream

    def abort(self, request_id: str) -> None:
        """Abort from any thread; the engine frees the slot before its next step."""
        self._inbox.put(lambda: self._abort(request_id))
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self._streams.pop(request_id, None)

    def stats(self) -> dict:
        return self._call(lambda: {
            "running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting),
            "free_slots": self.engine.scheduler.num_free_slots, "steps": self.engine.steps})

    def _drain_inbox(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            job()

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                self.last_step_at = time.monotonic()
                continue
            t0 = time.perf_counter()
            try:
                seqs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - fail the in-flight requests, keep serving
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            self.last_step_at = time.monotonic()
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t0, len(seqs))
            for seq in seqs:
                self._publish(seq)

    def _publish(self, seq: Sequence) -> None:
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        new = seq.output_ids[stream.sent:]
        lps = seq.logprobs[stream.sent:] if seq.params.logprobs is not None else []
        stream.sent = len(seq.output_ids)
        text = self.engine.detokenize(seq)
        stream.push(Update(tuple(new), tuple(lps), text, seq.finished, seq.finish_reason,
                           len(seq.prompt_ids), len(seq.output_ids)))
        if seq.finished:
            self._streams.pop(seq.request_id, None)

    def _fail_all(self, error: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream.push(error)
        self._streams.clear()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
