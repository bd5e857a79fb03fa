"""A checkpoint's safetensors files, opened on first read, checked to still hold the header and bytes read at open."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from elasticmoe.model.safetensors_header import CheckpointError, _pread_all, read_header

SAMPLES, SAMPLE_BYTES = 4, 4096  # windows of a file's tensor bytes, spread over them, whose digest open keeps


class OpenFiles:
    """The files of checkpoint directory `path`: read_header(name) reads one's header and keeps its size, mtime, layout
    and a digest of a sample of its tensor bytes; fd(name, tensor) opens it (once) to read a tensor, after checking it
    was not changed on disk since."""

    def __init__(self, path: Path):
        self.path = path
        self._fds: dict[str, int] = {}  # file name -> open descriptor
        self._opened: dict[str, tuple[int, int, str, str]] = {}  # name -> (size, mtime_ns, layout, sample) at open
        self._retired: list[int] = []  # descriptors of files found changed (a read may still use one): close()
        self._lock = threading.Lock()

    def read_header(self, name: str) -> dict[str, Any]:
        """read_header of file `name`; its size, mtime, layout and sample (_sample), all read through one descriptor,
        kept to tell a change on disk (_unchanged)."""
        try:
            fd = os.open(self.path / name, os.O_RDONLY)
        except OSError as e:
            read_header(self.path / name)  # the error naming a file that is missing or cannot be read
            raise CheckpointError(f"{self.path / name}: cannot open: {e}") from e
        try:
            st = os.fstat(fd)  # before the header: a change while it is read shows at the first read
            header = read_header(self.path / name, fd)
            self._opened[name] = (st.st_size, st.st_mtime_ns, _layout(header), _sample(self.path / name, fd, header))
        finally:
            os.close(fd)
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
        """The file `fd` reads has the header and bytes read at open: the same size and mtime, else (rewritten in
        place, or replaced before its first read) the same layout and sample when read again; otherwise its tensors
        are not where the offsets kept say, or hold another checkpoint's weights of the same shapes (a fine-tune, a
        re-download of another revision), and reading `tensor` would serve them beside the experts held."""
        size, mtime, layout, sample = self._opened[name]
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            return
        what = f"{self.path / name}: changed on disk since the checkpoint was opened ({size} bytes then, " \
               f"{st.st_size} now), so {tensor!r} cannot be read"
        try:
            header = read_header(self.path / name, fd)
            now = _layout(header)
            same = now == layout and _sample(self.path / name, fd, header) == sample
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from e
        if now != layout:
            raise CheckpointError(f"{what}: its header has other tensors or offsets; restart to serve the new file")
        if not same:
            raise CheckpointError(f"{what}: its tensors hold other bytes (another checkpoint of the same shapes?); "
                                  "restart to serve the new file")
        self._opened[name] = (st.st_size, st.st_mtime_ns, layout, sample)  # its bytes put back, or touched

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


def _sample(file: Path, fd: int, header: dict[str, Any]) -> str:
    """A digest of SAMPLES windows of SAMPLE_BYTES spread evenly over the tensor bytes of `fd` (all of them, where
    fewer): another checkpoint of the same shapes (the same header) holds other bytes there."""
    spans = [(m["start"], m["start"] + m["data_offsets"][1] - m["data_offsets"][0]) for m in header.values()]
    lo, hi = min((a for a, _ in spans), default=0), max((b for _, b in spans), default=0)
    if hi - lo <= SAMPLES * SAMPLE_BYTES:
        windows = [(lo, hi - lo)]
    else:
        step = (hi - lo - SAMPLE_BYTES) // (SAMPLES - 1)
        windows = [(lo + i * step, SAMPLE_BYTES) for i in range(SAMPLES)]
    digest = hashlib.blake2b(digest_size=16)
    try:
        for offset, n in windows:
            digest.update(_pread_all(fd, n, offset))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from e
    return digest.hexdigest()
