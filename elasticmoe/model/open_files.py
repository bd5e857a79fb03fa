"""A checkpoint's safetensors files, opened on first read and checked to still hold the header read at open."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from elasticmoe.model.safetensors_header import CheckpointError, read_header


class OpenFiles:
    """The files of checkpoint directory `path`: read_header(name) reads one's header and keeps its size, mtime and
    layout; fd(name, tensor) opens it (once) to read a tensor, after checking it was not changed on disk since."""

    def __init__(self, path: Path):
        self.path = path
        self._fds: dict[str, int] = {}  # file name -> open descriptor
        self._opened: dict[str, tuple[int, int, str]] = {}  # file name -> (size, mtime_ns, layout) at open
        self._retired: list[int] = []  # descriptors of files found changed (a read may still use one): close()
        self._lock = threading.Lock()

    def read_header(self, name: str) -> dict[str, Any]:
        """read_header of file `name`, its size, mtime and layout kept to tell a change on disk (_unchanged)."""
        try:
            st = os.stat(self.path / name)  # before the header: a change while it is read shows at the first read
        except OSError:
            st = None
        header = read_header(self.path / name)  # names a file that is missing or cannot be read
        st = st or os.stat(self.path / name)
        self._opened[name] = (st.st_size, st.st_mtime_ns, _layout(header))
        return header

    def fd(self, name: str, tensor: str) -> int:
        """The open descriptor of file `name`, to read `tensor` from: the file whose header was read at open."""
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                try:
                    fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.path / name}: cannot open: {e}") from e
            try:
                self._unchanged(name, fd, tensor)
            except CheckpointError:
                self._retired.append(self._fds.pop(name))  # the next read opens the path again (put back, say)
                raise
            return fd

    def _unchanged(self, name: str, fd: int, tensor: str) -> None:
        """The file `fd` reads has the header read at open: the same size and mtime, else (rewritten in place, or
        replaced before its first read) the same layout when read again; otherwise its tensors are not where the
        offsets kept say, and reading `tensor` there would give other bytes as its weights."""
        size, mtime, layout = self._opened[name]
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            return
        what = f"{self.path / name}: changed on disk since the checkpoint was opened ({size} bytes then, " \
               f"{st.st_size} now), so {tensor!r} cannot be read"
        try:
            now = _layout(read_header(self.path / name, fd))
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from e
        if now != layout:
            raise CheckpointError(f"{what}: its header has other tensors or offsets; restart to serve the new file")
        self._opened[name] = (st.st_size, st.st_mtime_ns, layout)  # the same layout (its bytes put back, touched)

    def close(self) -> None:
        """Close the files (reads reopen them)."""
        with self._lock:
            for fd in [*self._fds.values(), *self._retired]:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()


def _layout(header: dict[str, Any]) -> str:
    """A digest of a header's entries (names, dtypes, shapes, offsets): what reads rely on."""
    text = json.dumps(sorted((t, m["dtype"], m["shape"], m["start"], m["data_offsets"]) for t, m in header.items()))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
