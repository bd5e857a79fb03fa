"""A gRPC port on the gateway replica itself: Generation without Serve's proxy and Ray's streaming in between."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
from pathlib import Path

import grpc

from elasticmoe.config import DIRECT_IDLE_S, DIRECT_MAX_CONNECTIONS
from elasticmoe.gateway.generation_service import GenerationService, GenerationServicer, KeyFirst
from elasticmoe.rpc.generation_wire import add_generation_to_server

log = logging.getLogger(__name__)
HANDSHAKE_S = 10.0  # a client connection that has not begun HTTP/2 (its preface and settings) by then is closed
KEEPALIVE_S = 60.0  # a connection with calls in flight is pinged after this long silent; one whose client never
KEEPALIVE_TIMEOUT_S = 20.0  # answers within this is closed (a vanished host: its calls end and free their places)


class PortClaim:
    """One application's claim on a direct port of this node. SO_REUSEPORT lets any process of this user bind the
    port too, so another application's gateways would silently share its connections; each replica holds a shared
    flock on `<dir>/<port>-<lock_name(app)>.lock` while it serves, and a replica of another application finding one
    held is refused. A holder that dies drops its lock with it (a stale file claims nothing). The directory (a name
    anyone can guess under a shared $TMPDIR) must be this user's own, no link, written by no one else: another user
    who made it first could otherwise hold a lock there to block every application, or point it elsewhere."""

    def __init__(self, port: int, app: str, root: Path | None = None):
        # per user: SO_REUSEPORT shares a port among one user's processes only
        self.dir = (root or Path(tempfile.gettempdir())) / f"elasticmoe-direct-grpc-{os.getuid()}"
        self.port, self.app, self._fd = port, lock_name(app), None
        self._dir_fd = _private_dir(self.dir)  # the files below are opened through it: no path looked up again
        try:
            self._refuse_others()
            self._fd = os.open(f"{port}-{self.app}.lock", os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600,
                               dir_fd=self._dir_fd)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            self._refuse_others()  # one that claimed meanwhile: both refuse, neither shares
        except OSError:
            self.release()
            raise

    def _refuse_others(self) -> None:
        for name in os.listdir(self._dir_fd):
            port, _, rest = name.partition("-")
            other = rest.removesuffix(".lock")
            if port == str(self.port) and rest.endswith(".lock") and other != self.app and _held(name, self._dir_fd):
                raise OSError(f"direct_grpc: port {self.port} is already served by application {other!r} on this "
                              f"node; give each application a port of its own")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _private_dir(path: Path) -> int:
    """`path` made (0700) when missing, then opened: its descriptor. OSError naming it unless it is a directory (not
    a link) of this user that no other may write."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:  # a link (ELOOP), a file (ENOTDIR)
        raise OSError(f"direct_grpc: {path} is not a directory of its own ({e.strerror}); remove it, or give the "
                      f"replicas another TMPDIR") from None
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        os.close(fd)
        raise OSError(f"direct_grpc: {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}; the port "
                      f"claims need one of uid {os.getuid()} that no other may write (remove it, or give the "
                      f"replicas another TMPDIR)")
    return fd


def lock_name(app: str) -> str:
    """`app` as a lock file's name, one per application: as it is when only [A-Za-z0-9_.-] (1 to 64 of them), else
    its first 40 characters made safe, '~' (which no name kept as it is has) and a hash of the whole name. Replacing
    alone made "my app" and "my_app" one claim: they shared the port silently."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", app)
    if safe == app and 0 < len(app) <= 64:
        return app
    digest = hashlib.sha256(app.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:40]}~{digest}"


def _held(name: str, dir_fd: int) -> bool:
    """Whether some process holds a lock on the file `name` of the directory `dir_fd` (an exclusive try-lock fails)."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _connection_options(max_connections: int, idle_s: float) -> list[tuple[str, int]]:
    """gRPC server options bounding what local clients hold: without them a client that opened connections and left
    them idle, or opened TCP and never spoke, kept each (a descriptor, gRPC's buffers) for as long as it liked."""
    return [("grpc.so_reuseport", 1),  # shared by one application's replicas (PortClaim)
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.max_connection_idle_ms", int(idle_s * 1000)),
            ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_S * 1000)),
            ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000))]  # what gRPC 1.85 waits (default 60 s)


class DirectIngress:
    """A grpc.aio server on its own thread and event loop, serving `service` at host:port.

    Several gateway replicas on one node share the port (SO_REUSEPORT, gRPC's default on Linux): the kernel
    spreads new connections among them. Admission is the engine runner's, as through Serve; `max_rpcs` only
    bounds the calls one replica holds open (more get RESOURCE_EXHAUSTED from gRPC itself). Connections are bounded
    too (gRPC's options, _connection_options): at most `max_connections` at once (more are closed as they connect),
    each closed after `idle_s` without a call, HANDSHAKE_S without beginning HTTP/2, or a keepalive ping unanswered.
    """

    def __init__(self, service: GenerationService, host: str, port: int, max_rpcs: int, app: str = "",
                 claims: Path | None = None, max_connections: int = DIRECT_MAX_CONNECTIONS,
                 idle_s: float = DIRECT_IDLE_S):
        self.claim = PortClaim(port, app, claims) if port else None  # an ephemeral port (0) is nobody else's
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="direct-ingress", daemon=True)
        self._thread.start()
        try:
            options = _connection_options(max_connections, idle_s)
            self.server, self.port = self._call(self._start(service, host, port, max_rpcs, options), 30)
        except BaseException:
            self._end_loop()
            if self.claim is not None:
                self.claim.release()
            raise
        self.address = f"{host}:{self.port}"
        log.info("direct gRPC ingress on %s", self.address)

    def _call(self, coro, timeout_s: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    @staticmethod
    async def _start(service: GenerationService, host: str, port: int, max_rpcs: int, options: list):
        server = grpc.aio.server(maximum_concurrent_rpcs=max_rpcs, options=options,
                                 interceptors=[KeyFirst(service)])  # the key before the request is read
        add_generation_to_server(GenerationServicer(service), server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise OSError(f"direct_grpc: cannot listen on {host}:{port} ({e})") from None
        if not bound:
            raise OSError(f"direct_grpc: cannot listen on {host}:{port}")
        await server.start()
        return server, bound

    def alive(self) -> bool:
        """Whether the server's loop still runs (the replica's health check asks)."""
        return self._thread.is_alive() and self.loop.is_running()

    def stop(self, grace_s: float) -> None:
        """Refuse new calls at once, give the calls in flight up to `grace_s` to finish, then end them."""
        if self.claim is not None:  # the listener closes now: another application may take the port while we drain
            self.claim.release()
        try:
            if self.loop.is_running():
                self._call(self.server.stop(grace_s), grace_s + 10)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        """Stop the loop, join its thread and close it (its epoll fd and self-pipe), once."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # a loop still running cannot be closed: left to the daemon thread
            self.loop.close()
