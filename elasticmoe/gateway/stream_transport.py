"""The stream transport: raw frames on one long-lived bidirectional gRPC stream per shard, answers matched by id."""

from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import Future
from typing import Callable

import grpc

from elasticmoe.gateway.multiplex import Deadlines, Multiplexed, send_multiplexed
from elasticmoe.gateway.transport import Build, TransportError, _Channels, closed_error, wait_any
from elasticmoe.rpc import frames

STREAM_METHOD = "/elasticmoe.internal.v1.ExpertShard/RunExpertsStream"
# Frames queued for a stream that gRPC has not taken yet (it takes the next once the last is sent: a shard slow to
# read, or not reading, holds them here; a call past its deadline leaves its frame unsent), at most this many, as the
# socket transport's unsent frames (socket_conn.SPILL_FRAMES): one more is refused as busy (another copy takes it),
# once the frames of calls that ended (past their deadline) have been dropped: they count for nothing
QUEUE_FRAMES = 32
QUEUE_BYTES = 256 << 20  # and their bytes, at most: a frame that would pass it is refused so (one goes when alone)
_END = (0, b"")  # in a stream's queue: the end (frame id 0 names no call)


def _decode_reply(buf: bytes) -> frames.Reply | frames.FrameError:
    """frames.decode_reply, but an unreadable reply whose frame id was read comes back as its FrameError (one call
    fails, not the stream); one whose id was not read still raises (grpc ends the stream)."""
    try:
        return frames.decode_reply(buf)
    except frames.FrameError as e:
        if not e.frame_id:
            raise
        return e


class _Stream(Multiplexed):
    """One open RunExpertsStream: raw frames (rpc.frames) go out through a queue (QUEUE_FRAMES, QUEUE_BYTES); a reader
    thread resolves answers by id. A reply that cannot be read fails its call alone when its frame id was read; one
    whose id cannot be read ends the stream (grpc fails it): the stream's pending calls fail, the next send opens a
    new stream."""

    def __init__(self, channel: grpc.Channel, address: str, refusal: Callable[[str, BaseException], BaseException]):
        super().__init__(address)
        self._refusal = refusal  # the transport's: a frame over the shard's limit ends the stream (OVERSIZE)
        self._out: collections.deque = collections.deque()  # (frame id, frame), _END: the end; under _lock
        self._ready = threading.Condition(self._lock)  # something in _out
        self.queued, self.queued_bytes = 0, 0  # frames in _out (the end marker aside) and their bytes, under _lock
        method = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                       response_deserializer=_decode_reply, _registered_method=True)
        self._call = method(self._frames())
        threading.Thread(target=self._read, name=f"stream-{address}", daemon=True).start()

    def _frames(self):
        """The queued frames as gRPC takes them; one whose call ended meanwhile (its deadline passed, or the stream
        failed) is dropped unsent: nobody would read its answer, and the shard would compute it all the same."""
        while True:
            with self._ready:
                while not self._out:
                    self._ready.wait()
                frame_id, frame = self._out.popleft()
                if not frame_id:  # _END
                    return
                self.queued -= 1
                self.queued_bytes -= len(frame)
                live = frame_id in self.pending
            if live:
                yield frame

    def _put(self, item: tuple[int, bytes]) -> None:
        """(Holding _lock.) Queue a frame, or the end marker, for _frames."""
        self._out.append(item)
        self._ready.notify()

    def _full(self, size: int) -> bool:
        """(Holding _lock.) Whether a frame of `size` bytes would pass QUEUE_FRAMES / QUEUE_BYTES, once the frames
        queued for calls that have ended (their deadline passed) are dropped: gRPC has not begun any queued frame."""
        def over() -> bool:
            return bool(self.queued) and (self.queued >= QUEUE_FRAMES or self.queued_bytes + size > QUEUE_BYTES)
        if over():
            self._out = collections.deque(self.unended(self._out, 0))
            frames_left = [len(frame) for frame_id, frame in self._out if frame_id]
            self.queued, self.queued_bytes = len(frames_left), sum(frames_left)
        return over()

    def submit(self, frame_id: int, frame: bytes, fut: Future) -> bool:
        """Queue a frame; False when the stream has died (the caller opens a new one). Queued under the lock, as
        close()'s end marker is: a half-close cannot come between (the frame would never be sent). Past QUEUE_FRAMES
        or QUEUE_BYTES of frames gRPC has not taken (those of calls that ended aside), the call fails at once as busy
        (frames.BUSY)."""
        with self._lock:
            if self.dead:
                return False
            full = self._full(len(frame))
            if not full:
                self.pending[frame_id] = fut
                self.queued += 1
                self.queued_bytes += len(frame)
                self._put((frame_id, frame))
            queued, queued_bytes = self.queued, self.queued_bytes
        if full:
            fut.set_exception(TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"{frames.BUSY}: the stream to {self.address} has not taken the {queued} frames ({queued_bytes} "
                "bytes) queued before")))
        return True

    def _read(self) -> None:
        """The reader thread: resolve the answers; however it ends (the stream's end or failure, or a failure of its
        own, reading gRPC's refusal included), fail the calls still pending at once, not at their deadlines."""
        err: grpc.RpcError = TransportError(grpc.StatusCode.UNAVAILABLE, f"stream to {self.address} ended")
        try:
            for reply in self._call:
                if isinstance(reply, frames.FrameError):  # its framing intact, its id read: that call alone fails
                    self.fail_unreadable(reply, reply.frame_id)
                    continue
                self.resolve(reply)
        except grpc.RpcError as e:  # the stream's own call (grpc raises it), kept as its calls' failure and in error:
            e.__traceback__ = None  # its traceback's frames (this one) would hold this stream in a cycle with it
            err = e  # as gRPC ended it, should reading it as a refusal (Health asked again) fail
            err = self._refusal(self.address, e)
        except Exception as e:  # noqa: BLE001 - any reader failure fails the stream's calls
            err = TransportError(grpc.StatusCode.INTERNAL, f"stream to {self.address}: {e}")
        finally:
            self.fail(err)

    def fail(self, err: grpc.RpcError) -> None:
        self.fail_pending(err)
        with self._lock:
            self._put(_END)

    def close(self) -> None:
        """Half-close: calls in flight (their frames all queued before the end marker) still get their answers."""
        with self._lock:
            self.dead = True
            self._put(_END)


class StreamTransport(_Channels):
    """One long-lived bidirectional stream per shard; frames carry ids, answers are matched by id.

    A broken stream fails all its pending calls at once and is re-opened by the next send. Deadlines are kept
    here, per request: a late answer is dropped, the stream stays open.
    """

    def __init__(self, insecure: bool = False, options: list[tuple[str, int]] | None = None):
        super().__init__(insecure, options)
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count(1)
        self._deadlines = Deadlines("stream-deadlines")
        self._streams_lock = threading.Lock()  # guards _streams (never held with _Channels' _channels_lock)

    def _stream(self, address: str) -> _Stream:
        _, channel, renewed = self.connection(address)  # CANCELLED once closed
        with self._streams_lock:
            if self.closed:  # closed since: nothing would end a stream opened now
                # (close sets closed before it takes this lock: it finds the one opened here, or this finds closed)
                raise closed_error()
            if renewed:
                for s in self._streams.values():
                    s.close()
                self._streams.clear()
            s = self._streams.get(address)
            if s is None or s.dead:
                s = self._streams[address] = _Stream(channel, address, self.refusal)
            return s

    def send(self, address: str, build: Build, timeout_s: float) -> Future:
        frame_id = next(self._ids)

        def encode() -> bytes:  # a frame over the shard's limit fails alone, unsent (the shard would end the stream)
            frame = frames.request_frame(frame_id, build())
            self.check_size(address, len(frame))
            return frame
        return send_multiplexed(address, frame_id, encode, lambda: self._stream(address), self._deadlines, timeout_s)

    wait = staticmethod(wait_any)

    def retain(self, addresses) -> None:
        """Half-close the streams to shards at other addresses and close their channels (_Channels.retain)."""
        with self._streams_lock:
            gone = [self._streams.pop(a) for a in list(self._streams) if a not in addresses]
        for s in gone:
            s.close()
        super().retain(addresses)

    def close(self) -> None:
        """Fail every call in flight CANCELLED and end the streams; a call sent after (or while it closes) fails
        CANCELLED unsent: no stream opens once closed."""
        self._deadlines.close(closed_error())  # retired streams' calls too
        self.close_channels()  # closed: from now on _stream opens nothing
        with self._streams_lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.fail(closed_error())
            s._call.cancel()
