"""The expert shard's gRPC server: runs a layer's experts for the gateway, unary or as a stream of frames."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import grpc
import torch

from elasticmoe.experts.backlog import Backlog
from elasticmoe.experts.errors import out_of_memory, run_out_of_memory, stream_failure
from elasticmoe.experts.placement_calls import PLACEMENT_CALLS, PlacementCalls  # noqa: F401 - shard_server
from elasticmoe.experts.run_checks import decode_run
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frame_socket, frames
from elasticmoe.rpc.codec import MAX_MESSAGE_BYTES, encode_tensor
from elasticmoe.rpc.options import STREAM_REPLY_BYTES
from elasticmoe.rpc.staging import to_host

log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Injected faults, for failure tests (`ExpertShard.inject_faults`): each count is spent one call at a time."""

    fail_loads: int = 0  # LoadExperts calls that fail (INTERNAL) after loading, as a crash mid-load would
    run_delay_s: float = 0.0  # sleep before answering RunExperts (a straggler)
    load_delay_s: float = 0.0  # sleep holding the placement lock before each LoadExperts loads (a slow load)
    malformed_outputs: int = 0  # RunExperts answers with a wrong output shape


class _FrameAbort(Exception):
    """A RunExpertsStream frame refused (as context.abort would refuse a unary call): its code and message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _StreamEnd:
    """What ends a RunExpertsStream whose reading thread died (errors.stream_failure): its status code and message."""

    code: grpc.StatusCode
    message: str


class _FrameContext:
    """The part of a grpc context that _compute (and run_checks.decode_run) uses, for one frame of a stream."""

    @staticmethod
    def abort(code: grpc.StatusCode, message: str):
        raise _FrameAbort(code, message)


class ExpertServicer(PlacementCalls, pb_grpc.ExpertShardServicer):
    """Serves one ExpertStore. Bad requests get INVALID_ARGUMENT; experts not held come back in `missing`; a call
    whose tokens do not fit in memory gets RESOURCE_EXHAUSTED "shard out of memory: ..." (frames.OUT_OF_MEMORY).

    RunExperts takes at most `run_slots` workers at once, and LoadExperts / DropExperts at most PLACEMENT_CALLS
    (RESOURCE_EXHAUSTED "shard busy" beyond either), so Health and the controller's calls always find a free worker
    of the server's pool (shard_server.start_server), however busy the shard is or however many loads queue.
    """

    def __init__(self, store: ExpertStore, shard_id: str, run_slots: int = 8, max_rows: int = 1 << 16,
                 max_streams: int = 16, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_stream_reply_bytes: int = STREAM_REPLY_BYTES):
        self.store, self.shard_id = store, shard_id
        self.placement_version = 0
        self.started = time.monotonic()
        self.calls = 0  # calls and frames taken (decoded), served or answered `missing` (GetStats: the store's served)
        self._calls_lock = threading.Lock()
        self.max_rows = max_rows
        self.faults = Faults()
        self._init_placement()
        self._run_slots = threading.BoundedSemaphore(run_slots)
        self.max_streams = max_streams  # open RunExpertsStreams: each holds one server worker while open
        self.max_stream_replies = 32  # answers a stream holds while its client reads none (then its reader waits)
        self.max_stream_reply_bytes = max_stream_reply_bytes  # and their bytes (one answer alone always goes)
        self._streams = threading.BoundedSemaphore(max_streams)
        self.readers: set[threading.Thread] = set()  # each open RunExpertsStream's reading thread, until it returns
        self.frame_port = 0  # the frame listener's port (Health tells the gateways), 0 while there is none
        self.frame_unix_path = ""  # and its Unix socket's path on this host ("": none)
        self.max_message_bytes = max_message_bytes  # the largest message taken (Health tells the gateways)

    def RunExperts(self, request, context):
        if not self._run_slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{frames.BUSY}: all RunExperts workers in use")
        try:
            return self._run(request, context)
        except Exception as e:  # noqa: BLE001 - a bug here is INTERNAL, as on the frame paths (grpc would say UNKNOWN)
            if context.code() not in (None, grpc.StatusCode.OK):
                raise  # an abort with its own code (INVALID_ARGUMENT, ...)
            code, message = _failure(request, e)
            context.abort(code, message)
        finally:
            self._run_slots.release()

    def RunExpertsStream(self, request_iterator, context):
        """Frames in, replies out (matched by id): each frame runs as RunExperts would, one after another on this
        stream's reading thread (serve_frames); a bad frame gets its status code in the reply."""
        if not self._streams.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{frames.BUSY}: {self.max_streams} streams open")
        replies: queue.SimpleQueue = queue.SimpleQueue()
        backlog, over = Backlog(self.max_stream_replies, self.max_stream_reply_bytes), threading.Event()
        if not context.add_callback(self._streams.release):  # already over
            self._streams.release()
            return
        if not context.add_callback(lambda: (over.set(), replies.put(None))):  # ended or cancelled: stop yielding
            return  # it ended just now (the first callback has run: the place is given back); no reader to start

        def put(parts: list) -> None:  # a client that reads no answers stops this reader, not the shard's memory
            backlog.enter(frame_socket.nbytes(parts), over)
            replies.put(b"".join(parts))

        def read() -> None:
            try:
                self.serve_frames(request_iterator, put)
                replies.put(None)  # the client half-closed and every frame is answered
            except Exception as e:  # noqa: BLE001 - the client went away (the callback ends the replies), or not:
                if not (over.is_set() or isinstance(e, (grpc.RpcError, ConnectionAbortedError))):
                    log.exception("RunExpertsStream: the reading thread failed; the stream ends")
                    replies.put(_StreamEnd(*stream_failure(e)))  # its frames unread would wait for their deadlines
            finally:
                self.readers.discard(threading.current_thread())

        reader = threading.Thread(target=read, name="expert-stream-reader", daemon=True)
        self.readers.add(reader)
        reader.start()
        while (reply := replies.get()) is not None:
            if isinstance(reply, _StreamEnd):  # after the answers that came before it
                context.abort(reply.code, reply.message)
            yield reply  # returns once gRPC has handed the answer on (the client's window took it)
            backlog.leave(len(reply))

    def serve_frames(self, requests: Iterable, put: Callable[[list], None]) -> None:
        """The frames of one RunExpertsStream or one frame-listener connection, run one after another on the thread
        reading them (no hand-off to another thread: 0.1 ms less per round trip, measured); connections (one per
        gateway) run at once, up to the run slots (a full shard queues frames rather than refusing them). Each
        reply (a list of buffers, frames.reply_parts) goes to put(); a frame that cannot be read (a FrameError) gets
        INVALID_ARGUMENT. Returns once `requests` ends; raises what reading `requests` raises."""
        for frame in requests:
            if isinstance(frame, frames.FrameError):  # unreadable: this frame fails, the stream goes on
                invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                put(frames.reply_parts(frame.frame_id, code=invalid, error=str(frame)))
                continue
            self._run_slots.acquire()
            self._frame(frame, put)

    def _frame(self, frame: frames.Request, put: Callable[[list], None]) -> None:
        """One frame (holding a run slot): its reply, or its status code and message as a unary call would get. The
        slot is given back before the reply is written (as a unary call's is before gRPC sends its answer): a peer
        slow to read it holds no worker for as long as the write blocks (up to frame_socket.SEND_TIMEOUT_S)."""
        try:
            out, missing, us = self._compute(frame, _FrameContext)
            reply = frames.reply_parts(frame.id, out, missing, us, self.placement_version)
        except _FrameAbort as e:
            reply = frames.reply_parts(frame.id, code=e.code.value[0], error=str(e))
        except Exception as e:  # noqa: BLE001 - as RunExperts answers it (_failure); the stream lives on
            code, message = _failure(frame, e)
            reply = frames.reply_parts(frame.id, code=code.value[0], error=message)
        finally:
            self._run_slots.release()
        put(reply)

    def _run(self, request, context) -> pb.RunExpertsResponse:
        out, missing, us = self._compute(request, context)
        if missing:
            return pb.RunExpertsResponse(missing=missing, placement_version=self.placement_version)
        return pb.RunExpertsResponse(output=encode_tensor(out), compute_us=us, placement_version=self.placement_version)

    def _compute(self, request, context) -> tuple[torch.Tensor | None, list[int], int]:
        """A RunExpertsRequest (or a stream's frames.Request) -> (output [T, H] on the CPU, missing, compute us)."""
        hidden, ids, weights = decode_run(request, context, self.store.spec, self.max_rows, self.store.device,
                                          self.store.dtype)
        with self._calls_lock:  # calls run on many threads at once
            self.calls += 1
        if self.faults.run_delay_s:
            time.sleep(self.faults.run_delay_s)
        snap = self.store.snapshot(request.layer)  # one snapshot: a concurrent drop shows up as `missing`
        routed = self.store.routed(ids)  # one pass serves both the holding check and the stats
        missing = self.store.missing(request.layer, routed, snap)
        if missing:  # the gateway re-sends these tokens elsewhere
            return None, missing, 0
        with self.store.computing():  # busy_us: overlapping calls count once
            t0 = time.perf_counter()
            (out,) = to_host(self.store.forward(request.layer, hidden, ids, weights, snap))  # [T, H]; waits for a GPU's
            us = int((time.perf_counter() - t0) * 1e6)
        self.store.count(request.layer, routed, us, request.duplicate)  # GetStats' counters: the calls served
        if self.faults.malformed_outputs > 0:
            self.faults.malformed_outputs -= 1
            out = out[:-1] if out.shape[0] else torch.zeros(1, out.shape[1])
        return out, [], us

    def GetStats(self, request, context):
        st = self.store.stats()
        tokens = [pb.ExpertTokens(layer=l, expert=e, tokens=n) for (l, e), n in sorted(st.tokens.items())]
        duplicates = [pb.ExpertTokens(layer=l, expert=e, tokens=n) for (l, e), n in sorted(st.duplicates.items())]
        return pb.GetStatsResponse(
            shard_id=self.shard_id, uptime_s=time.monotonic() - self.started, weight_bytes=st.weight_bytes,
            held=[pb.ExpertRef(layer=l, expert=e) for l, e in st.held], tokens=tokens, calls=st.calls,
            compute_us=st.compute_us, busy_us=st.busy_us, placement_version=self.placement_version,
            duplicates=duplicates)

    def Health(self, request, context):
        return pb.HealthResponse(ok=True, shard_id=self.shard_id, placement_version=self.placement_version,
                                 frame_port=self.frame_port, max_message_bytes=self.max_message_bytes,
                                 frame_unix_path=self.frame_unix_path)


def _failure(request, e: Exception) -> tuple[grpc.StatusCode, str]:
    """A RunExperts call's (or a frame's) failure: out of memory is RESOURCE_EXHAUSTED naming the layer, the tokens
    and the bytes (the shard is alive: the gateway sends them to another copy), anything else a bug (INTERNAL)."""
    if out_of_memory(e):
        shape = request.topk_ids.shape
        message = run_out_of_memory(request.layer, shape[0] if len(shape) else 0, e)
        log.warning("RunExperts: %s", message)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, message
    log.exception("RunExperts failed")
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
