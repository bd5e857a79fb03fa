"""One TLS connection shared by a reading thread and writing threads: one SSL call at a time, waits outside the lock."""

from __future__ import annotations

import select
import ssl
import threading
import time

_EVENTS = {ssl.SSLWantReadError: select.POLLIN, ssl.SSLWantWriteError: select.POLLOUT}
WRITE_BYTES = 256 << 10  # bytes per SSL write: Python's ssl reports one only once all of it is out (no partial writes)


def _wait(fd: int, events: int, timeout_s: float | None) -> bool:
    """Until fd is ready for `events` (or has hung up / failed); False when timeout_s ran out first."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000))))


class SerialTLS:
    """An SSLSocket whose SSL object is never used by two threads at once (OpenSSL does not promise that a reader
    and a writer may call into one SSL object concurrently): the socket is non-blocking and every SSL call holds a
    lock; a call that must wait (SSLWantRead / SSLWantWrite) releases it and waits in poll(), so a writer waiting for
    room never keeps the reader from draining what the peer sends, and the other way round. What a single-threaded
    event loop does with one SSL object, shared by threads. Writers still take turns per frame (the caller's lock).

    recv_into blocks until data, end of stream or an error, as a blocking socket's; sendall fails (TimeoutError)
    when it moves nothing (no 256 KiB piece written) for send_timeout_s."""

    def __init__(self, sock: ssl.SSLSocket, send_timeout_s: float):
        sock.setblocking(False)
        self.sock, self.send_timeout_s = sock, send_timeout_s
        self.fd = sock.fileno()
        self._lock = threading.Lock()

    def recv_into(self, view: memoryview) -> int:
        while True:
            with self._lock:
                try:
                    return self.sock.recv_into(view)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                    events = _EVENTS[type(e)]
            _wait(self.fd, events, None)

    def recv_nowait(self, view: memoryview) -> int:
        """As recv_into, without waiting: BlockingIOError when nothing can be read now."""
        with self._lock:
            try:
                return self.sock.recv_into(view)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise BlockingIOError("nothing to read now") from None

    def pending(self) -> int:
        """Decrypted bytes waiting inside the SSL object (poll() on the socket does not see them)."""
        with self._lock:
            return self.sock.pending()

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        since = time.monotonic()
        while view:
            with self._lock:
                try:
                    sent = self.sock.send(view[:WRITE_BYTES])  # after a WantWrite: the same bytes again
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as e:
                    sent, events = 0, _EVENTS[type(e)]
            if sent:
                view, since = view[sent:], time.monotonic()
                continue
            left = self.send_timeout_s - (time.monotonic() - since)
            if left <= 0 or not _wait(self.fd, events, left):
                raise TimeoutError(f"TLS write moved nothing for {self.send_timeout_s:.0f} s")

    def send_nowait(self, data) -> int:
        """Write data (at most WRITE_BYTES) without waiting: the bytes written, 0 when there is no room now (then
        write the same bytes again, as sendall does)."""
        with self._lock:
            try:
                return self.sock.send(data)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.sock.close()

