"""Frame connections between processes on one host over a Unix domain socket instead of loopback TCP."""

from __future__ import annotations

import fcntl
import glob
import logging
import os
import re
import secrets
import socket
import stat
import tempfile

log = logging.getLogger(__name__)
ENV = "ELASTICMOE_FRAME_UNIX"  # "0": no Unix socket (frames over TCP only), on both ends
MAX_PATH = 100  # sockaddr_un holds 108 bytes on Linux, 104 on macOS: longer paths are not bound
# a Unix stream socket's writer holds at most its send buffer in flight (Linux's default 208 KiB): a MiB frame then
# waits on the reader several times; asked for 4 MiB (the kernel caps it at net.core.wmem_max)
SEND_BUFFER = 4 << 20
NAME = re.compile(r"frames-[0-9a-f]{24}\.sock")  # a listener's socket's file name (bind)


def tune(sock: socket.socket) -> None:
    """A connection's send buffer (either end: each writes frames)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def private_dir() -> str | None:
    """$TMPDIR/elasticmoe-<uid>, made 0700 if missing; None (and a warning) where it exists and is not a directory
    of this user's that only this user can enter: another user could otherwise plant or read sockets in it."""
    path = os.path.join(tempfile.gettempdir(), f"elasticmoe-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        log.warning("no Unix socket for frames: cannot make %s: %s", path, e)
        return None
    if not _private(path):
        info = os.lstat(path)
        log.warning("no Unix socket for frames: %s is not a private directory of uid %d (mode %o, owner %d)",
                    path, os.getuid(), stat.S_IMODE(info.st_mode), info.st_uid)
        return None
    return path


def _private(folder: str) -> bool:
    """Whether `folder` is a directory (not a link) of this user's that no one else can enter."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def bind() -> tuple[socket.socket | None, str]:
    """A listening Unix socket at a new, unguessable path in private_dir() (each listener its own: a gateway that
    finds the path reaches this listener and no other), and that path; (None, "") where disabled or not possible."""
    if not enabled():
        return None, ""
    folder = private_dir()
    if folder is None:
        return None, ""
    path = os.path.join(folder, f"frames-{secrets.token_hex(12)}.sock")  # NAME
    if len(path.encode()) > MAX_PATH:
        log.warning("no Unix socket for frames: %s is longer than %d bytes (set TMPDIR shorter)", path, MAX_PATH)
        return None, ""
    sweep(folder)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _hold(path)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError as e:
        sock.close()
        unlink(path)
        log.warning("no Unix socket for frames: cannot listen on %s: %s", path, e)
        return None, ""
    return sock, path


_held: dict[str, int] = {}  # socket path -> its lock file's descriptor, locked while this process listens there


def _hold(path: str) -> None:
    """Lock `path`.lock for as long as this process lives (or until unlink): the kernel drops the lock when the
    process dies however it dies, so sweep() can tell a dead listener's socket file from a live one's."""
    fd = os.open(path + ".lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    _held[path] = fd


def sweep(folder: str) -> int:
    """Remove the socket files of listeners whose process died without closing them (killed: no unlink ran), those
    whose lock file nobody holds; how many."""
    removed = 0
    for lock in glob.glob(os.path.join(folder, "frames-*.sock.lock")):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: its listener is gone
        except OSError:
            os.close(fd)
            continue
        unlink(lock[:-len(".lock")])  # (not one of this process's: flock on its lock would have failed)
        os.close(fd)
        removed += 1
    return removed


def connect(path: str, timeout: float) -> socket.socket | None:
    """A connection to the listener at `path`; None where disabled, where `path` is not a listener's socket in a
    private directory of this user's (as bind() makes them), or where this process cannot reach it (another host or
    container, the listener gone): the caller uses TCP."""
    if not path or not enabled() or not os.path.isabs(path):
        return None
    folder, name = os.path.split(path)
    if not NAME.fullmatch(name) or not _private(folder):  # a listener's socket as bind() makes them, and only that:
        return None  # Health's word alone never points the gateway's writes at another local socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    tune(sock)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def unlink(path: str) -> None:
    """Remove a listener's socket file and its lock file, and let the lock go."""
    for name in (path, path + ".lock"):
        try:
            os.unlink(name)
        except OSError:
            pass
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)
