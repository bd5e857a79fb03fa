"""Raw-socket helpers for tests of the servers' connection limits."""

from __future__ import annotations

import socket
import time


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server ends `s` within `seconds` (what it writes meanwhile is read and dropped)."""
    s.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if not s.recv(1 << 16):
                return True
        except socket.timeout:
            continue
        except OSError:  # reset
            return True
    return False
