"""The load tracker's test clock (policy's time.monotonic, moved by hand) and a shard's counters."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.autoscaler import policy


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(policy.time, "monotonic", c)
    return c


def counters(served: np.ndarray, layers: list[int]) -> dict[tuple[int, int], int]:
    """{(model layer, expert): cumulative tokens} of one shard. served: [L, E]."""
    return {(layers[l], e): int(n) for (l, e), n in np.ndenumerate(served) if n}
