"""The autoscaler's test clocks (policy's time.monotonic, or its whole time module, moved by hand) and a shard's
counters."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.autoscaler import policy


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SteppedTime:
    """Stands for policy's `time` module, moved only by the test (`now`): a thread preempted between two calls on a
    loaded machine cannot end a real cool-down or warm-up before the check; the wall clock is `now` + 1.7e9."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 1.7e9


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(policy.time, "monotonic", c)
    return c


def counters(served: np.ndarray, layers: list[int]) -> dict[tuple[int, int], int]:
    """{(model layer, expert): cumulative tokens} of one shard. served: [L, E]."""
    return {(layers[l], e): int(n) for (l, e), n in np.ndenumerate(served) if n}
