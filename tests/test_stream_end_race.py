"""A RunExpertsStream that ends (the client cancels) between the handler's two add_callback calls: the handler must
return, not wait for replies for ever and hold a server worker (real gRPC server in-process, plaintext)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import torch

from elasticmoe.experts.server import ExpertServicer
from elasticmoe.gateway.stream_transport import STREAM_METHOD
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import tls
from elasticmoe.rpc.frame_service import add_shard_servicer
from tests.shard_util import files  # noqa: F401


class _EndsBeforeSecondCallback:
    """The server's own context, except that its second add_callback waits until the client has cancelled."""

    def __init__(self, context, window: threading.Event, cancelled: threading.Event):
        self._context, self.window, self.cancelled, self.calls = context, window, cancelled, 0

    def add_callback(self, callback) -> bool:
        self.calls += 1
        if self.calls == 2:
            self.window.set()
            assert self.cancelled.wait(10)
            deadline = time.monotonic() + 10
            while self._context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
        return self._context.add_callback(callback)

    def __getattr__(self, name):
        return getattr(self._context, name)


class _Servicer(ExpertServicer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window, self.cancelled, self.returned = threading.Event(), threading.Event(), threading.Event()
        self.late: list = []

    def RunExpertsStream(self, request_iterator, context):
        ctx = _EndsBeforeSecondCallback(context, self.window, self.cancelled)
        try:
            yield from super().RunExpertsStream(request_iterator, ctx)
        finally:
            self.late.append(ctx.calls)
            self.returned.set()


def test_a_stream_ended_between_the_two_callbacks_returns(files):  # noqa: F811
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    servicer = _Servicer(store, "s", run_slots=1, max_streams=1)
    pool = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(pool)
    add_shard_servicer(servicer, server)
    port = tls.add_port(server, "127.0.0.1:0", True, None)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stop = threading.Event()

    def nothing():  # a client that sends no frame and never half-closes until the test ends
        stop.wait(30)
        return
        yield
    try:
        call = channel.stream_stream(STREAM_METHOD)(nothing())
        assert servicer.window.wait(10)
        call.cancel()
        servicer.cancelled.set()
        assert servicer.returned.wait(5), "the handler still waits for replies: a server worker lost"
        assert servicer.late == [2]
        assert servicer._streams.acquire(blocking=False)  # the stream's place was given back
    finally:
        stop.set()
        channel.close()
        server.stop(None)
