"""The answers of one RunExpertsStream not yet sent on: bounded by their count and by their bytes."""

from __future__ import annotations

import threading

WAKE_S = 0.2  # a waiting reader looks at whether its stream has ended at least this often


class Backlog:
    """Answers computed and not yet taken by gRPC (a client that reads slowly, or not at all): at most `count`, and
    at most `nbytes` bytes unless one alone is larger (it goes once the others have). The stream's reader waits in
    enter() for room; leave() once gRPC has handed an answer on."""

    def __init__(self, count: int, nbytes: int):
        self.count, self.nbytes = count, nbytes
        self.held, self.bytes = 0, 0  # answers entered and not left, and their bytes
        self._cv = threading.Condition()

    def _full(self, size: int) -> bool:
        return self.held >= self.count or (self.held > 0 and self.bytes + size > self.nbytes)

    def enter(self, size: int, over: threading.Event) -> None:
        """Wait for room for an answer of `size` bytes, then count it; ConnectionAbortedError once `over` is set
        (the stream ended: its client will read nothing more)."""
        with self._cv:
            while self._full(size):
                if over.is_set():
                    raise ConnectionAbortedError("the stream ended with answers unread")
                self._cv.wait(WAKE_S)
            self.held += 1
            self.bytes += size

    def leave(self, size: int) -> None:
        with self._cv:
            self.held -= 1
            self.bytes -= size
            self._cv.notify()
