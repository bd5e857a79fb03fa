"""The calls an expert store served, as GetStats reports them: calls, compute and busy time, tokens per expert."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

BINCOUNT_IDS = 1 << 16  # routed_counts: ids below this are counted in a histogram (max id + 1 bins), others sorted

@dataclass(frozen=True)
class StoreStats:
    """GetStats' figures, each group read at once (ExpertStore.stats): what is held, from one look at the layers; the
    counters of the calls served (answered with an output: count()), under their one lock."""

    held: list[tuple[int, int]]  # (layer, expert), sorted
    weight_bytes: int  # the bytes of those experts' weights
    calls: int  # calls served
    compute_us: int  # the sum of their compute_us
    tokens: dict[tuple[int, int], int]  # (layer, expert) -> token-slots those calls routed to it
    busy_us: int = 0  # time with at least one call computing (`computing`), the stretch running now included
    # of `tokens`, those of calls marked duplicate (a hedge, a re-send: another call counts them as routed demand)
    duplicates: dict[tuple[int, int], int] = field(default_factory=dict)


class ServedCalls:
    """The counters of the calls served (count()) and the time spent computing (computing()), under one lock:
    forward() and count() run on many server threads at once."""

    def __init__(self):
        self.tokens_served: dict[tuple[int, int], int] = {}
        self.tokens_duplicate: dict[tuple[int, int], int] = {}  # of tokens_served, those of duplicate calls
        self.calls = 0
        self.compute_us = 0  # the sum of the calls' compute_us
        self.busy_s = 0.0  # finished stretches with at least one call computing (`computing`)
        self._computing, self._busy_from = 0, 0.0  # calls computing now; when the stretch running now began
        self._lock = threading.Lock()

    def stats(self, held: list[tuple[int, int]], weight_bytes: int) -> StoreStats:
        """StoreStats of these counters, read together, beside what the store holds."""
        with self._lock:
            calls, compute_us, tokens = self.calls, self.compute_us, dict(self.tokens_served)
            duplicates = dict(self.tokens_duplicate)
            busy = self.busy_s + (time.perf_counter() - self._busy_from if self._computing else 0.0)
        return StoreStats(held, weight_bytes, calls, compute_us, tokens, int(busy * 1e6), duplicates)

    @contextmanager
    def computing(self) -> Iterator[None]:
        """A call computing (its compute_us window) for busy_us: the time with at least one call computing, calls
        that overlap (several gateways, micro-batches) counted once, where compute_us sums them."""
        with self._lock:
            if not self._computing:
                self._busy_from = time.perf_counter()
            self._computing += 1
        try:
            yield
        finally:
            with self._lock:
                self._computing -= 1
                if not self._computing:
                    self.busy_s += time.perf_counter() - self._busy_from

    def count(self, layer: int, routed: dict[int, int], compute_us: int = 0, duplicate: bool = False) -> None:
        """A call served: one more call, its tokens per expert (ExpertStore.routed) to tokens_served (and to
        tokens_duplicate for a `duplicate` call: a hedge or re-send whose slots another call counts as demand) and the
        microseconds its forward() took (as its answer says) to compute_us."""
        with self._lock:
            self.calls += 1
            self.compute_us += compute_us
            for e, c in routed.items():
                self.tokens_served[(layer, e)] = self.tokens_served.get((layer, e), 0) + c
                if duplicate:
                    self.tokens_duplicate[(layer, e)] = self.tokens_duplicate.get((layer, e), 0) + c


def routed_counts(topk_ids: torch.Tensor) -> dict[int, int]:
    """Tokens per expert id in topk_ids [T, k] (ids of -1 ignored), in id order (ExpertStore.routed)."""
    if topk_ids.device.type == "cpu":  # numpy: ~5 us for a call's few ids, where torch's unique takes ~40
        flat = topk_ids.numpy().ravel()  # [T * k]
        flat = flat[flat >= 0]
        if not flat.size:
            return {}
        if flat.max() < BINCOUNT_IDS:
            counts = np.bincount(flat)  # [max id + 1]
            ids = counts.nonzero()[0]
            return dict(zip(ids.tolist(), counts[ids].tolist()))
    ids, counts = topk_ids[topk_ids >= 0].unique(return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))
