"""Weight-loading progress: a tqdm bar of bytes read (with the rate) on a terminal, one log line otherwise."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable

log = logging.getLogger("elasticmoe.load")
ENV = "ELASTICMOE_PROGRESS"  # 1: always draw bars (e.g. under a pager), 0: never; unset: only on a terminal
MIN_LOG_S = 1.0  # a load faster than this is not logged (rebalances move a few experts at a time)


def bars_enabled(stream: Any = None) -> bool:
    """Whether to draw bars: $ELASTICMOE_PROGRESS if set, else whether `stream` (stderr) is a terminal."""
    flag = os.environ.get(ENV, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


class LoadProgress:
    """Progress of loading `items` equal-sized units (experts, layers) whose bytes `read_bytes()` counts.

    On a terminal: a tqdm bar in bytes with the rate; the total is known once the first unit is read
    (`equal_items`), else the bar shows bytes and rate only. Otherwise nothing while loading, and one
    INFO line at the end if the load took at least MIN_LOG_S (no log spam when stderr is a file).
    """

    def __init__(self, desc: str, items: int, read_bytes: Callable[[], int], *, equal_items: bool = True,
                 enabled: bool | None = None):
        self.desc, self.items, self.read_bytes, self.equal = desc, items, read_bytes, equal_items
        self.start_bytes, self.t0, self.done = read_bytes(), time.perf_counter(), 0
        self.bar = None
        if (bars_enabled() if enabled is None else enabled) and items > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True, mininterval=0.25,
                            file=sys.stderr)

    @property
    def bytes(self) -> int:
        return self.read_bytes() - self.start_bytes

    def step(self, n: int = 1) -> None:
        """`n` more units are read."""
        self.done += n
        if self.bar is None:
            return
        if self.equal and self.bar.total is None and self.done:
            self.bar.total = self.bytes * self.items // self.done
        self.bar.update(self.bytes - self.bar.n)

    def close(self) -> str:
        """End the bar; log (and return) the summary line."""
        seconds = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
        mb = self.bytes / 1e6
        line = f"{self.desc}: {self.done} in {seconds:.1f}s, {mb:.1f} MB ({mb / max(seconds, 1e-9):.1f} MB/s)"
        if seconds >= MIN_LOG_S:
            log.info(line)
        return line

    def __enter__(self) -> "LoadProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
