"""A socket connection's reading side: answers read under its read token, by a waiting caller or its own thread."""

from __future__ import annotations

import select
import threading
import time

import grpc

from elasticmoe.gateway.multiplex import Multiplexed
from elasticmoe.gateway.transport import TransportError
from elasticmoe.rpc import frame_socket, frames

PARK_S = 0.5  # a connection's thread leaves reading to the callers for this long after one last read (it then
# reads only answers that nobody waits for: a hedged-around call's late failure, say), waking twice a second
IDLE_POLL_S = 1.0  # how long a connection's thread waits in poll() at a time
_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def _ready(fds: list[int], timeout_s: float) -> list[int]:
    """Those of fds with something to read (or ended) within timeout_s."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(max(0, int(timeout_s * 1000 + 0.999)))]


class Reading(Multiplexed):
    """The reading side of a connection to a shard's frame listener (socket_conn._Conn opens it and writes). Reading
    takes the connection's read token: a caller waiting for answers (SocketTransport.wait) takes it and reads them on
    its own thread, and the connection's thread stays out of its way while callers do (it reads only when nobody has
    for PARK_S). A reply whose frame id cannot be read, or a socket that fails or ends, fails every pending call at
    once (fail); a readable id's unreadable reply fails that call alone."""

    sock: object  # the connection's socket (socket.socket or SerialTLS), set by the subclass (None until open)

    def __init__(self, address: str):
        super().__init__(address)
        self._token = threading.RLock()  # held by whoever reads the socket (this connection's thread or a caller;
        # reentrant: a callback run by a reading caller may wait on another call)
        self._reader: frame_socket.FrameReader | None = None  # set once open
        self._read_at = 0.0  # monotonic: when a caller last read (the connection's thread parks for PARK_S after)
        self.wakeups = 0  # times the connection's thread woke up (each takes the GIL)
        self._ended = self._eof = TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {address} ended")

    def _serve(self) -> None:
        """The connection's thread: read answers as they come while no caller does; park while callers read."""
        fd = self.sock.fileno()
        while not self.dead:
            self.wakeups += 1
            if time.monotonic() - self._read_at < PARK_S:
                time.sleep(PARK_S)
                continue
            if not self.buffered() and not _ready([fd], IDLE_POLL_S):
                continue
            if not self._token.acquire(blocking=False):
                time.sleep(PARK_S)  # a caller is reading: it reads what woke us
                continue
            try:
                if not self.read_ready():
                    return
            finally:
                self._token.release()

    def claim(self) -> bool:
        """Take the read token for the calling thread (False: not open yet, ended, or someone is reading)."""
        if self._reader is None or self.dead or not self._token.acquire(blocking=False):
            return False
        self._read_at = time.monotonic()
        return True

    def buffered(self) -> bool:
        """(Holding the token.) Answers' bytes already inside the connection (TLS), which poll() does not see."""
        return self._reader.buffered()

    def release(self) -> None:
        self._read_at = time.monotonic()
        self._token.release()

    def read_ready(self) -> bool:
        """(Holding the token.) Resolve the answers that can be read now, without waiting: those of the first read
        that completes a frame (the next read would nearly always find nothing yet: a syscall and an exception
        saved; the caller polls again); False once the connection has ended (its pending calls failed)."""
        try:
            while True:
                try:
                    got = self._reader.step(block=False)
                except BlockingIOError:
                    return True
                if got is None:
                    break  # end of stream
                if not got:
                    continue  # part of a large frame: read on while bytes are here
                for buf in got:
                    try:
                        reply = frames.decode_reply(buf)
                    except frames.FrameError as e:
                        if not e.frame_id:
                            raise  # whose answer it is cannot be told: the connection's calls fail
                        self.fail_unreadable(e, e.frame_id)
                        continue  # its framing is intact: the other calls' answers still come
                    if reply.id == 0 and reply.code == _RESOURCE_EXHAUSTED:  # the listener refused the connection
                        with self._lock:
                            self._ended = TransportError(grpc.StatusCode.RESOURCE_EXHAUSTED, reply.error)
                    self.resolve(reply)
                return True
        except OSError as e:
            self._ending(TransportError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.address}: {e}"))
        except Exception as e:  # noqa: BLE001 - a reply that cannot be read fails the connection's calls
            self._ending(TransportError(grpc.StatusCode.INTERNAL, f"connection to {self.address}: {e}"))
        self.fail(self._ended)
        return False

    def _ending(self, err: TransportError) -> None:
        """Why the connection ends (its pending calls' failure): the first reason given (a failed write, not the
        end the reader then sees), unless the listener's refusal was read: that stays the reason ('shard busy': the
        shard is alive), whatever the socket said after it (a reset, say)."""
        with self._lock:
            if self._ended is self._eof:
                self._ended = err


    def fail(self, err: grpc.RpcError) -> None:
        """Fail every pending call and end the connection (the subclass's: it holds the socket)."""
        raise NotImplementedError
