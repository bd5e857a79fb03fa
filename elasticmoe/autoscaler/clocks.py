"""The offset between the wall clock and the monotonic one, for clocks a restarted controller carries over."""

from __future__ import annotations

from types import ModuleType


def wall_minus_monotonic(clock: ModuleType, tries: int = 5) -> float:
    """clock.time() - clock.monotonic() (`clock`: the `time` module, or a test's stand-in), the wall clock read
    between two monotonic reads; of `tries` readings the one with the narrowest bracket (a thread preempted between
    two plain reads shifted every restored clock by the pause)."""
    best, offset = float("inf"), 0.0
    for _ in range(tries):
        m0 = clock.monotonic()
        wall = clock.time()
        m1 = clock.monotonic()
        if m1 - m0 < best:
            best, offset = m1 - m0, wall - (m0 + m1) / 2
        if best < 1e-5:
            break
    return offset
