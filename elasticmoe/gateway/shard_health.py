"""The dispatcher's view of shard health: suspects, failure reports off the engine thread, the hedge delay."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable

import grpc

from elasticmoe.gateway.routing import RoutingTable

log = logging.getLogger(__name__)
HEDGE_MEDIAN_EVERY = 16  # round trips between two recomputations of the hedging median
_REPORTERS = itertools.count()  # numbers each dispatcher's failure-reports thread


class ShardHealth:
    """Suspected shards, failure reports and the hedge delay of a dispatcher (gateway.dispatcher.GrpcDispatcher,
    which provides set_table: a report's answer, a newer table, is installed there)."""

    def __init__(self, on_failure: Callable[[str], RoutingTable | None] | None, suspect_s: float, hedge_min_s: float,
                 hedge_factor: float):
        self.on_failure, self.suspect_s = on_failure, suspect_s
        self.hedge_min_s, self.hedge_factor = hedge_min_s, hedge_factor
        self.suspects: dict[str, float] = {}  # shard id -> monotonic time it last failed or straggled
        self._stuck: dict[str, int] = {}  # shard id -> its hedged-around calls still unanswered (> 0; straggling)
        self._stuck_lock = threading.Lock()
        self.latency_s: deque[float] = deque(maxlen=256)  # recent successful call round trips (note_latency)
        self._latencies = 0  # round trips noted so far
        self._median: tuple[int, float | None] = (-HEDGE_MEDIAN_EVERY, None)  # (at that count, median of latency_s)
        self._reports: queue.Queue[str | None] = queue.Queue()  # None: wake the thread to stop (stop_reports)
        self._reports_stopped = False
        self._reporting: set[str] = set()  # shards whose report is queued or running (one at a time each)
        self._reporting_lock = threading.Lock()  # suspect() runs on the engine's and the transports' threads
        self._reporter = threading.Thread(target=self._report_loop, name=f"failure-reports-{next(_REPORTERS)}",
                                          daemon=True)
        self._reporter.start()

    def set_table(self, table: RoutingTable, now: bool = False) -> bool:
        raise NotImplementedError

    def suspect(self, shard_id: str, report: bool) -> None:
        """Avoid this shard for `suspect_s` where other copies exist; tell the controller (asynchronously)."""
        self.suspects[shard_id] = time.monotonic()
        if report and self.on_failure is not None and not self._reports_stopped:
            with self._reporting_lock:  # check and add at once: two threads' failures of one shard, one report
                if shard_id in self._reporting:
                    return
                self._reporting.add(shard_id)
            self._reports.put(shard_id)

    def suspected(self, table: RoutingTable) -> frozenset[int]:
        """Shards to avoid where another copy exists: failed or straggled within `suspect_s`, or still owing the
        answer to a call that was hedged around (a shard paused for longer than `suspect_s` is not probed again,
        at a hedge delay's cost per probe, until it has answered)."""
        now = time.monotonic()
        recent = [s for s, t in list(self.suspects.items()) if now - t < self.suspect_s]
        return table.index_of(recent + list(self._stuck))

    def stuck(self) -> set[str]:
        """Shards owing the answer to a call that was hedged around: not answering (paused, or far behind). A hedge
        never goes to one, and routing falls back to them only after shards that merely failed or straggled."""
        return set(self._stuck)

    def straggling(self, shard_id: str, future: Future) -> None:
        """A call to `shard_id` was hedged around: the shard stays suspected until that call ends. A call that then
        fails UNAVAILABLE (its connection broke: a dead shard, not a slow one) is reported to the controller at
        once; one that runs out its deadline starts a new suspicion period (the shard is still not answering)."""
        with self._stuck_lock:
            self._stuck[shard_id] = self._stuck.get(shard_id, 0) + 1

        def done(f: Future) -> None:
            with self._stuck_lock:
                self._stuck[shard_id] -= 1
                if not self._stuck[shard_id]:
                    del self._stuck[shard_id]  # only shards that owe answers stay (suspected() reads the keys)
            e = f.exception()
            if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE:
                self.suspect(shard_id, report=True)
            elif e is not None:
                self.suspect(shard_id, report=False)
        future.add_done_callback(done)

    def stop_reports(self) -> None:
        """End the failure-reports thread without waiting for it: at once if idle, else when the report it runs
        returns (its answer is not installed). Reports not yet sent, and later ones, are dropped."""
        self._reports_stopped = True
        self._reports.put(None)

    def _report_loop(self) -> None:
        while True:
            shard_id = self._reports.get()
            if self._reports_stopped:
                return
            try:
                new = self.on_failure(shard_id)
                if new is not None and not self._reports_stopped:
                    self.set_table(new)
            except Exception as e:  # noqa: BLE001 - the poller still brings the next table
                log.warning("reporting shard %s failed: %s", shard_id, e)
            finally:
                self._reporting.discard(shard_id)

    def note_latency(self, seconds: float) -> None:
        """A successful call's round trip (hedge_after_s reads them)."""
        self.latency_s.append(seconds)
        self._latencies += 1

    def hedge_after_s(self) -> float:
        """Seconds before a straggling call is hedged: hedge_factor x the median recent round trip. The median is
        recomputed after every HEDGE_MEDIAN_EVERY round trips, not at each of the engine's checks (sorting 256
        floats each time took 2.6% of the served gateway's GIL time); while fewer than that have been measured, at
        each new one (a cold first call would otherwise set the delay for the next HEDGE_MEDIAN_EVERY)."""
        at, median = self._median
        fresh = self._latencies != at and self._latencies < HEDGE_MEDIAN_EVERY
        if self._latencies - at >= HEDGE_MEDIAN_EVERY or fresh:
            lat = sorted(self.latency_s)
            median = lat[len(lat) // 2] if lat else None
            self._median = (self._latencies, median)
        return max(self.hedge_min_s, self.hedge_factor * median if median is not None else 1.0)
