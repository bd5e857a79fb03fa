"""Runs the engine's step loop in its own thread and streams each request's tokens to asyncio callers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from typing import Callable

from elasticmoe.engine.engine import Engine
from elasticmoe.engine.resume import Resume
from elasticmoe.engine.sampling import SamplingParams
from elasticmoe.engine.scheduler import QueueFull, RequestFailed, Sequence
from elasticmoe.gateway.request_stream import RequestStream, Update
from elasticmoe.metrics import log_this_time

log = logging.getLogger(__name__)
SHUTTING_DOWN = "the gateway is shutting down"
FAILED = "the request could not be served; retry later"


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux), for memory-growth checks under load."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class EngineRunner:
    """Owns an Engine; all engine calls happen on its thread. Admission never waits for the engine: requests are
    validated and counted on the caller's side and handed over through an inbox the engine drains between steps."""

    def __init__(self, engine: Engine, on_step: Callable[[float, int], None] | None = None,
                 on_idle: Callable[[], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.on_idle = on_idle  # once each time the engine runs out of work (no step follows to report it)
        sched = engine.scheduler
        held = len(engine.held_slots)  # slots out while being zeroed: free again by the next step
        self.capacity = sched.num_free_slots + held + len(sched.running) + sched.max_queue  # running + waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()
        self._live = 0  # admitted and not yet ended (under _lock)
        self.refused = 0  # client requests refused at capacity (QueueFull), under _lock: see stats()
        self._refused_groups: weakref.WeakSet = weakref.WeakSet()  # groups already counted in refused
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False  # set (under _lock) by close() or a dying loop: nothing more is admitted
        self.last_step_at = time.monotonic()
        self.step_errors = 0
        self.gave_up = False  # three steps in a row raised and ended the requests; no step has succeeded since
        self.hook_errors = 0  # on_step raised (logged, counted; the step's results still go out)
        self.request_errors = 0  # one request's part of the loop raised (its admission, abort, update): it alone ended
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 group: object | None = None, resume: Resume | None = None) -> RequestStream:
        """Admit a request and return its update stream, at once (no waiting for a step).

        Raises InvalidRequest (a bad field) or QueueFull (running + waiting at capacity) before anything is
        queued, and RequestFailed once the runner is closed. `request_id` need not be unique: the engine keys
        requests by an id of its own. The caller must `aclose()` the stream if it stops reading before the end
        (that aborts the request). `group`: an object (weakly referenced) that the choices of one client request
        share (OpenAI's n): its refusals at capacity count once in stats()["refused"]. `resume`: a broken stream's
        tokens and text (Engine.add_request); its updates carry what follows them, its counts all outputs.
        """
        self.engine.validate(prompt_ids, params, resume)
        key = f"{request_id}#{next(self._ids)}"
        stream = RequestStream(self, key, asyncio.get_running_loop())
        ids = list(prompt_ids)
        with self._lock:  # posted under the lock: close() ends every request admitted before it
            if self._closed:
                raise RequestFailed(SHUTTING_DOWN)
            if self._live >= self.capacity:
                self._refusal(group)
                raise QueueFull(f"the gateway is at capacity ({self.capacity} requests running or waiting); "
                                f"retry later")
            self._live += 1
            self._post(lambda: self._add(key, ids, params, stream, group, resume))
        return stream

    def _refusal(self, group: object | None) -> None:
        """Count a refusal at capacity (under _lock): once per client request, however many of its choices."""
        if group is None or group not in self._refused_groups:
            self.refused += 1
            if group is not None:
                self._refused_groups.add(group)

    def _post(self, job: Callable[[], None]) -> None:
        self._inbox.put(job)
        self._wake.set()

    def _add(self, key: str, prompt_ids: list[int], params: SamplingParams, stream: RequestStream,
             group: object | None = None, resume: Resume | None = None) -> None:
        if stream.done or self._closed:  # closed (or the runner closing) before the engine saw it
            self._release()
            if not stream.done:
                stream.push(RequestFailed(SHUTTING_DOWN))
            return
        try:
            self.engine.add_request(key, prompt_ids, params, resume)
        except Exception as e:  # noqa: BLE001 - e.g. QueueFull from the scheduler's own bound
            if isinstance(e, QueueFull):  # refused at capacity too: counted as generate() counts its own
                with self._lock:
                    self._refusal(group)
            self._release()
            stream.push(e)
            return
        if resume is not None:  # a resumed stream's given tokens are its client's already
            stream.sent = len(resume.token_ids)
        self._streams[key] = stream

    def _release(self) -> None:
        with self._lock:
            self._live -= 1

    def abort(self, key: str) -> None:
        """Abort from any thread; the engine frees the slot before its next step."""
        self._post(lambda: self._abort(key))

    def _abort(self, key: str) -> None:
        try:
            if not self._closed:  # once closed, close() may run this beside a step still in flight
                self.engine.abort(key)
        finally:  # its place is freed, whatever the engine did
            if self._streams.pop(key, None) is not None:
                self._release()

    def stats(self) -> dict:
        """Occupancy, read without waiting for the engine thread.

        refused: client requests refused at capacity (QueueFull: HTTP 429, gRPC RESOURCE_EXHAUSTED), one per
        request however many of its choices (OpenAI's n) were refused, as the gateway's metrics count a rejected
        request: an operator compares it with the 429s clients saw. request_errors: failures in the engine thread's
        handling of one request (its admission, abort, update or last word), each ending that request only.
        held_slots: KV-cache slots held back until a step zeroes them (their zeroing raised as their request ended),
        neither free nor running: running + free_slots + held_slots is every slot. kv_blocks, kv_blocks_free: the KV
        cache's blocks (of limits.kv_block_size positions), and those no running sequence or held slot reserved (a
        cached block no one holds counts free); preemptions: running sequences preempted for blocks (recomputed
        later). prefix_cache_queried_tokens, prefix_cache_hit_tokens: the prompt tokens admitted with prefix caching
        on, and those of them found cached (not computed)."""
        sched = self.engine.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting), "free_slots": sched.num_free_slots,
                "held_slots": len(self.engine.held_slots), "kv_blocks": sched.pool.num_blocks,
                "kv_blocks_free": sched.pool.num_free, "preemptions": sched.preemptions,
                "prefix_cache_queried_tokens": sched.pool.queried_tokens,
                "prefix_cache_hit_tokens": sched.pool.hit_tokens,
                "steps": self.engine.steps, "admitted": self._live, "capacity": self.capacity, "refused": self.refused,
                "step_retries": self.engine.step_retries, "failed_requests": self.engine.failed_requests,
                "request_errors": self.request_errors, "rss_bytes": _rss_bytes()}

    def _drain_inbox(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                job()
            except Exception:  # noqa: BLE001 - a job is one request's (its admission, its abort), never the loop's
                self._request_error("an inbox job raised")

    def _loop(self) -> None:
        try:
            self._steps()
        finally:  # stopped, or (a bug) the loop died: either way no request is left waiting
            with self._lock:
                self._closed = True
            self._end_all()

    def _steps(self) -> None:
        busy = False
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                if busy:  # the last step's requests ended (or the last ones were aborted)
                    busy = False
                    if self.on_idle is not None:
                        self._guarded(self.on_idle)
                self._wake.wait(0.05)
                self._wake.clear()
                self.last_step_at = time.monotonic()
                continue
            t0 = time.perf_counter()
            try:
                seqs = self.engine.step()
            except Exception:  # noqa: BLE001 - a bug outside any request's part of the step
                self._step_error()
                continue
            self.step_errors, self.gave_up = 0, False
            self.last_step_at = time.monotonic()
            busy = True
            if self.on_step is not None:
                self._guarded(self.on_step, time.perf_counter() - t0, len(seqs))
            for seq in seqs:
                self._publish(seq)

    def _guarded(self, hook: Callable, *args) -> None:
        """The per-step and idle hooks (step log, gauges): a failure is logged, never the engine thread's end."""
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - observability must not cost a request
            self.hook_errors += 1
            if log_this_time(self.hook_errors):
                log.exception("the per-step hook raised (%d times so far)", self.hook_errors)

    def _step_error(self) -> None:
        """Engine.step attributes failures to requests; anything escaping it is retried, and only after
        three in a row are the engine's requests ended (UNAVAILABLE), so the loop itself never dies. The waiting
        ones too: a step that raised before scheduling them would leave them waiting for as long as it raises. The
        requests the step ended before it raised (a failed row) end at once: no step result would carry them."""
        log.exception("engine step raised")
        for seq in self.engine.take_unreported():  # requests it ended before it raised: their clients hear it now
            self._publish(seq)
        self.step_errors += 1
        time.sleep(0.05 * self.step_errors)
        if self.step_errors < 3:
            return
        self.step_errors, self.gave_up = 0, True  # before the requests end: whoever sees one end sees this too
        sched = self.engine.scheduler
        for seq in list(sched.running) + list(sched.waiting):
            self.engine.fail(seq, RuntimeError("engine step failed repeatedly"))
            self._publish(seq)

    def _request_error(self, what: str) -> None:
        self.request_errors += 1
        if log_this_time(self.request_errors):
            log.exception("%s (%d times so far); that request ended, the others go on", what, self.request_errors)

    def _publish(self, seq: Sequence) -> None:
        """Hand a sequence's news to its stream. Anything raising here is that request's (its text, its stream):
        it alone ends, with RequestFailed, as one the engine ended."""
        stream = self._streams.get(seq.request_id)
        if stream is None:
            return
        try:
            self._send(seq, stream)
        except Exception as e:  # noqa: BLE001 - this request only
            self._request_error(f"publishing request {seq.request_id} raised")
            self._drop(seq, stream, e)

    def _drop(self, seq: Sequence, stream: RequestStream, error: Exception) -> None:
        """End a request whose update failed: in the engine (counted, its slot freed), its place, its stream."""
        try:
            self.engine.fail(seq, error)  # sets seq.error (what its client is told), frees its slot if it runs
        except Exception:  # noqa: BLE001 - its place and its client still hear of its end
            self._request_error(f"ending request {seq.request_id} raised")
        if self._streams.pop(seq.request_id, None) is not None:
            self._release()
        self._tell(stream, seq.error or RequestFailed(FAILED))

    def _tell(self, stream: RequestStream, error: BaseException) -> None:
        """Push a request's last word (an error), whatever its stream does: a push that raises is counted."""
        try:
            stream.push(error)
        except Exception:  # noqa: BLE001 - e.g. its caller's event loop refused the wake-up
            self._request_error("pushing a request's error raised")

    def _send(self, seq: Sequence, stream: RequestStream) -> None:
        delta = ""
        if seq.error is None:
            try:
                delta = self.engine.text_delta(seq)
            except Exception as e:  # noqa: BLE001 - e.g. the tokenizer failed on its tokens: this request only
                self.engine.fail(seq, e)
        if seq.finished and self._streams.pop(seq.request_id, None) is not None:
            self._release()  # before the last item, so a caller that saw the end sees the room too
        if seq.error is not None:
            stream.push(seq.error)
            return
        new = seq.output_ids[stream.sent:]
        lps = seq.logprobs[stream.sent:] if seq.params.logprobs is not None else []
        stream.sent = len(seq.output_ids)
        if not stream.push(Update(tuple(new), tuple(lps), seq.text if seq.finished else "", seq.finished,
                                  seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids), delta,
                                  seq.cached_tokens)):
            self._abort(seq.request_id)  # its caller's loop is closed: it would run to max_tokens for no one

    def close(self) -> None:
        """Stop the engine thread; every request admitted before (or during) this ends with RequestFailed
        unless it finished first, and later ones are refused with it."""
        with self._lock:
            self._closed = self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            log.warning("the engine thread is still in a step; ending its requests without it")
        self._end_all()

    def _end_all(self) -> None:
        """End every admitted request with RequestFailed (once closed: touches no engine state)."""
        self._drain_inbox()  # adds fail their streams, aborts drop theirs
        for key in list(self._streams):
            stream = self._streams.pop(key, None)
            if stream is not None:
                self._release()
                self._tell(stream, RequestFailed(SHUTTING_DOWN))


__all__ = ["EngineRunner", "QueueFull"]
