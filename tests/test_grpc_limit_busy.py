"""A shard whose gRPC server refuses a call past its maximum_concurrent_rpcs (gRPC's own RESOURCE_EXHAUSTED
"Concurrent RPC limit exceeded!", before the servicer sees it) is busy, not failed: its call goes to another copy,
else to it again within the step, and it is neither reported nor dead for the step (it was both, and a single copy's
tokens waited failover_s for a table that never came). Real in-process shards; the limited one is a gRPC server of
one call at a time, the one taken by a RunExpertsStream held open."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from elasticmoe.experts.server import ExpertServicer
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.stream_transport import STREAM_METHOD
from elasticmoe.gateway.transport import GRPC_CONCURRENCY_LIMIT, is_busy
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames, tls
from elasticmoe.rpc.codec import server_options
from elasticmoe.rpc.frame_listener import FrameListener
from elasticmoe.rpc.frame_service import add_shard_servicer
from elasticmoe.rpc.options import channel_options
from tests.shard_util import E, Shards, _inputs, _reference, _req, _run, files  # noqa: F401

WIRES = ["unary", "stream", "socket"]


class _Limited:
    """A shard (every layer, `experts`) whose gRPC server takes one call at a time, with a frame listener as
    start_server's; hold() takes that one call with a RunExpertsStream left open, free() ends it."""

    def __init__(self, files, experts: list[int]):  # noqa: F811
        store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
        store.load([(l, e) for l in files.spec.moe.moe_layers for e in experts])
        self.servicer = ExpertServicer(store, "limited")
        self.server = grpc.server(futures.ThreadPoolExecutor(8), options=server_options(), maximum_concurrent_rpcs=1)
        add_shard_servicer(self.servicer, self.server)
        self.address = f"127.0.0.1:{tls.add_port(self.server, '127.0.0.1:0', False, tls.tls_files())}"
        self.listener = FrameListener(self.servicer.serve_frames, "127.0.0.1", [0])
        self.servicer.frame_port = self.listener.port
        self.server.start()
        self._channel = tls.channel(self.address, channel_options())
        self._held: grpc.Call | None = None
        self._reader: threading.Thread | None = None

    def hold(self) -> None:
        frames_in: queue.SimpleQueue = queue.SimpleQueue()
        method = self._channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
        self._held = method(iter(frames_in.get, None))
        deadline = time.monotonic() + 10
        while not self.servicer.readers:  # the stream has reached the servicer: it holds the server's one call
            assert time.monotonic() < deadline, "the held stream never started"
            time.sleep(0.01)
        (self._reader,) = self.servicer.readers  # the held stream's reading thread (the only stream open)

    def free(self) -> None:
        """End the held stream and wait for its reading thread: that one, not every reader (a gateway's stream may
        take the freed place at once and stay open: waiting for none left waited 10 s, then failed)."""
        self._held.cancel()
        self._reader.join(10)
        assert not self._reader.is_alive(), "the held stream never ended"

    def close(self) -> None:
        if self._held is not None:
            self._held.cancel()
        self._channel.close()
        self.listener.close(None).wait(10)
        self.server.stop(None).wait(10)


@pytest.fixture
def limited(files):  # noqa: F811
    """A function making _Limited shards, all closed at the end."""
    made: list[_Limited] = []

    def make(experts: list[int]) -> _Limited:
        made.append(_Limited(files, experts))
        return made[-1]
    yield make
    for shard in made:
        shard.close()


def _table(addresses: list[str], layers: list[int], copies: dict[int, list[int]]) -> RoutingTable:
    experts = [[(s, 1.0 / len(copies[e])) for s in copies[e]] for e in range(E)]
    return RoutingTable.from_dict({"version": 1, "layers": {l: experts for l in layers},
                                   "shards": [{"id": f"s{i}", "address": a} for i, a in enumerate(addresses)]})


def test_grpcs_own_refusal_is_what_the_server_answers_and_reads_as_busy(limited):
    shard = limited(list(range(E)))
    shard.hold()
    channel = tls.channel(shard.address, channel_options())
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ExpertShardStub(channel).Health(pb.HealthRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.details() == GRPC_CONCURRENCY_LIMIT
        assert is_busy(e.value)
        shard.free()
        assert _healthy_within(channel, 10.0)  # room again
    finally:
        channel.close()


def _healthy_within(channel: grpc.Channel, seconds: float) -> bool:
    """Health answered ok within `seconds`, asking again while the server still counts the freed call (its reading
    thread has ended, but gRPC releases the call's place a moment after the handler returns: asked at once, a
    loaded host answered the limit's refusal once more)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return pb_grpc.ExpertShardStub(channel).Health(pb.HealthRequest(), timeout=10).ok
        except grpc.RpcError as e:
            if not is_busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@pytest.mark.parametrize("wire", WIRES)
def test_a_shard_at_its_grpc_limit_is_failed_over_and_not_reported(files, limited, wire):  # noqa: F811
    shard = limited(list(range(E)))
    other = Shards(files, [list(range(E))])
    reported: list[str] = []
    d = GrpcDispatcher(transport=wire, timeout_s=5, failover_s=10, on_failure=reported.append)
    try:
        layer, inputs = other.layers[0], _inputs(files, 11)
        d.set_table(_table([shard.address, other.addresses[0]], [layer], {e: [0, 1] for e in range(E)}))
        shard.hold()
        out, _ = _run(d, layer, inputs)
        torch.testing.assert_close(out, _reference(files, layer, *inputs), rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and set(d.shard_tokens) == {"s1"}, (d.failovers, d.shard_tokens)
        assert not d._reporting and reported == [] and [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
    finally:
        d.close()
        other.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_single_copy_at_its_grpc_limit_is_asked_again_within_the_step(files, limited, wire):  # noqa: F811
    """s0 holds the only copies of experts 0-3 and its server is full for 0.5 s: the step asks it again and gets its
    answer once it has room (it was reported, dead for the step, and the step ended unavailable after failover_s)."""
    shard = limited([0, 1, 2, 3])
    other = Shards(files, [[4, 5, 6, 7]])
    reported: list[str] = []
    d = GrpcDispatcher(transport=wire, timeout_s=5, failover_s=10, on_failure=reported.append)
    try:
        layer, inputs = other.layers[0], _inputs(files, 12)
        d.set_table(_table([shard.address, other.addresses[0]], [layer], {e: [e * 2 // E] for e in range(E)}))
        shard.hold()
        room = threading.Timer(0.5, shard.free)
        room.start()
        t0 = time.perf_counter()
        out, _ = _run(d, layer, inputs)
        took = time.perf_counter() - t0  # the step's, not free()'s: the stream it opened may hold the place
        room.join()
        torch.testing.assert_close(out, _reference(files, layer, *inputs), rtol=1e-5, atol=1e-6)
        assert took < 5 and d.failovers >= 1 and d.shard_tokens.get("s0", 0) > 0, took
        assert not d._reporting and reported == [] and [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
    finally:
        d.close()
        other.close()


def test_a_frame_connection_refused_by_the_grpc_limit_fails_its_calls_as_busy(files, limited):  # noqa: F811
    """The socket transport asks Health for the frame port at each connect: gRPC's refusal of it fails the calls
    waiting for the connection as busy (frames.BUSY), not as a shard failure."""
    shard = limited(list(range(E)))
    shard.hold()
    t = SocketTransport()
    try:
        with pytest.raises(grpc.RpcError) as e:
            t.send(shard.address, lambda: _req(files, files.spec.moe.moe_layers[0]), 5).result(timeout=10)
        assert is_busy(e.value) and e.value.details().startswith(frames.BUSY), e.value.details()
    finally:
        t.close()
