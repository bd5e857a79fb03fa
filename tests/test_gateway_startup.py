"""A gateway replica whose start-up fails after its engine thread started (its direct_grpc port taken) stops that
thread, the table poller and the shard channels before the error reaches Serve. Real parts: a tiny checkpoint, a
real controller on an event loop, a port held by a real socket."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from elasticmoe.gateway.deployment import Gateway
from tests.controller_util import _args, _LoopHandle, controller  # noqa: F401 - a fixture
from tests.controller_util import model  # noqa: F401 - a fixture

# our class under Serve's ingress wrapper (whose async __init__ runs ours)
_GATEWAY = next(c for c in Gateway.func_or_class.__mro__ if "__serve_build_asgi_app__" in c.__dict__)
STARTED = ("engine", "table-poller", "failure-reports")  # the threads a GatewayCore starts (name prefixes)


def _started_threads(before: set[threading.Thread], timeout_s: float) -> list[str]:
    """Names of STARTED threads (by prefix) alive that were not in `before`, once none is left or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [t.name for t in threading.enumerate()
                if t not in before and t.name.startswith(STARTED) and t.is_alive()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_a_taken_direct_port_stops_the_engine_thread_it_started_after(model, controller):  # noqa: F811
    """Before, the OSError reached Serve with the engine thread still stepping (and holding the model and its KV
    cache) and the poller still polling: Serve replaces the replica, but this one's threads stayed until then. The
    dispatcher's failure-reports thread stayed for good (it was never stopped), one per failed start."""
    ctrl, loop = controller
    taken = socket.socket()  # no SO_REUSEPORT: the gateway's listener cannot bind it
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    before = set(threading.enumerate())
    try:
        with pytest.raises(OSError, match=rf"direct_grpc: cannot listen on 127\.0\.0\.1:{port}"):
            _GATEWAY(_args(model, num_shards=1, direct_grpc={"port": port}), _LoopHandle(ctrl, loop))
        assert not _started_threads(before, 15)  # the poller ends within its poll's hold (1 s)
    finally:
        taken.close()
