"""Back-offs of the controller's decisions that fail alike until something is repaired (a checkpoint file, memory)."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Failing:
    """A decision failing: its last error, the failures in a row and when (monotonic) it is tried again."""

    error: str
    tries: int
    after: float
    wait_s: float


class Backoffs:
    """Failing decisions by name ("re-home <shards>", "scale out", "revive <shard>"): the first retry is the next round's,
    each one after waits twice as long as the last, from 2 s up to the failure's `max_s`; a success ends it."""

    def __init__(self):
        self.failing: dict[str, Failing] = {}

    def due(self, name: str) -> bool:
        """Whether `name` may be tried now (not failing, or its wait is over)."""
        f = self.failing.get(name)
        return f is None or time.monotonic() >= f.after

    def failed(self, name: str, error: str, max_s: float) -> tuple[Failing, bool]:
        """Count a failure of `name`: (its state, whether `error` is new: not the last failure's)."""
        last = self.failing.get(name)
        tries = (last.tries if last else 0) + 1
        wait = 0.0 if tries == 1 else min(max_s, 2.0 ** (tries - 1))
        self.failing[name] = Failing(error, tries, time.monotonic() + wait, wait)
        return self.failing[name], last is None or last.error != error

    def succeeded(self, name: str) -> None:
        self.failing.pop(name, None)

    def view(self) -> dict[str, dict]:
        """For the status: each failing decision's error, failures in a row and seconds to its next try."""
        now = time.monotonic()
        return {name: {"error": f.error, "tries": f.tries, "retry_in_s": round(max(0.0, f.after - now), 1)}
                for name, f in sorted(self.failing.items())}
