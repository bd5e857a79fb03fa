"""Safetensors headers: parsed, and checked against the file size and each entry's dtype and shape."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from elasticmoe.model.hub import absent

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (HeaderTooLarge): what a real header can be


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or field at fault."""


def read_header(file: Path, fd: int | None = None) -> dict[str, Any]:
    """Parse a safetensors header and check that the file holds every byte it promises, and no others (the tensors
    tile the data). Each entry gains "start": the file offset of its first byte. `fd`: read through this open
    descriptor of `file` (the path then only names it in errors)."""
    try:
        if fd is not None:
            return _parse(file, fd)
        with open(file, "rb") as f:
            return _parse(file, f.fileno())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: {absent(file)}") from e
    except OSError as e:  # a directory, no permission
        raise CheckpointError(f"{file}: cannot read: {e}") from e


def _parse(file: Path, fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise CheckpointError(f"{file}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:  # read whole, a garbage length would take as much memory as the file
        raise CheckpointError(f"{file}: corrupt safetensors header: its length field says {n} bytes, more than "
                              f"safetensors' limit of {MAX_HEADER_BYTES}")
    if n > size - 8:
        raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file {size})")
    try:
        header = json.loads(_pread_all(fd, n, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    except RecursionError:  # arrays or objects nested thousands deep: no header's shape
        raise CheckpointError(f"{file}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (the header is not a JSON object)")
    header.pop("__metadata__", None)
    for tensor, meta in header.items():
        _check_entry(file, tensor, meta)
    _check_tiling(file, header, size, 8 + n)
    for meta in header.values():
        meta["start"] = 8 + n + meta["data_offsets"][0]
    return header


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """n bytes of `fd` from `offset` (fewer only where the file ends before)."""
    parts, done = [], 0
    while done < n:
        part = os.pread(fd, n - done, offset + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


def _check_entry(file: Path, tensor: str, meta: Any) -> None:
    """One header entry: a dtype, a shape of sizes and data_offsets [begin, end] spanning exactly its bytes."""
    ok = isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list) \
        and all(_is_size(d) for d in meta["shape"])
    span = meta.get("data_offsets") if ok else None
    if not ok or not (isinstance(span, list) and len(span) == 2 and all(map(_is_size, span)) and span[0] <= span[1]):
        raise CheckpointError(f"{file}: corrupt safetensors header: {tensor!r} needs a dtype, a shape and "
                              f"data_offsets [begin, end], got {str(meta)[:200]}")
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is not None:
        need = math.prod(meta["shape"]) * dtype.itemsize
        if span[1] - span[0] != need:
            raise CheckpointError(f"{file}: {tensor!r} {meta['dtype']} {meta['shape']} needs {need} bytes, its "
                                  f"data_offsets {span} span {span[1] - span[0]}")


def _is_size(x: Any) -> bool:
    """A size or offset: an int >= 0 (JSON's true / false are not, as safetensors reads them)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_tiling(file: Path, header: dict[str, Any], size: int, data: int) -> None:
    """The tensors' byte spans tile the data after the header (which starts at byte `data`) exactly, as safetensors
    requires ("entirely indexed, no holes"; transformers cannot load a file that breaks it): in offset order each
    starts where the one before ends, the first at 0, and the last ends at the file's end. An overlap would read
    one tensor's bytes as another's; a hole or a tail are bytes no tensor owns (a header that lies)."""
    at, before, cut = 0, "the header", []  # cut: the tensors past the file's end, in offset order
    for tensor, meta in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = meta["data_offsets"]
        if begin != at:
            how = f"overlaps {before}" if begin < at else f"leaves {begin - at} bytes after {before} no tensor holds"
            raise CheckpointError(f"{file}: corrupt safetensors header: {tensor!r} data_offsets {[begin, end]} {how} "
                                  f"(tensors must tile the data, each starting where the one before ends at {at})")
        at, before = end, repr(tensor)
        if data + end > size:
            cut.append(tensor)
    if cut:
        more = f", and the {len(cut) - 1} tensors after it" if len(cut) > 1 else ""
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, tensors need {data + at}: "
                              f"{cut[0]!r} ends past the file's end{more})")
    if data + at < size:
        last = f"the last tensor ({before})" if header else "the header, which names no tensors,"
        raise CheckpointError(f"{file}: corrupt safetensors file: {size - data - at} bytes after {last} that no "
                              f"tensor holds")


def same_tensor(file_a: Path, meta_a: dict[str, Any], file_b: Path, meta_b: dict[str, Any]) -> bool:
    """Whether two header entries (read_header's, with "start") hold the same dtype, shape and bytes."""
    if (meta_a["dtype"], meta_a["shape"]) != (meta_b["dtype"], meta_b["shape"]):
        return False
    size = meta_a["data_offsets"][1] - meta_a["data_offsets"][0]
    if size != meta_b["data_offsets"][1] - meta_b["data_offsets"][0]:
        return False
    with open(file_a, "rb") as a, open(file_b, "rb") as b:
        a.seek(meta_a["start"])
        b.seek(meta_b["start"])
        while size > 0:
            n = min(size, 1 << 24)
            if a.read(n) != b.read(n):
                return False
            size -= n
    return True
