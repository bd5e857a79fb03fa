"""Safetensors headers: parsed, and checked against the file size and each entry's dtype and shape."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or field at fault."""


def read_header(file: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the file holds every byte it promises, and no others (the tensors
    tile the data). Each entry gains "start": the file offset of its first byte."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing") from e
    except OSError as e:  # a directory, no permission
        raise CheckpointError(f"{file}: cannot read: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (the header is not a JSON object)")
    header.pop("__metadata__", None)
    for tensor, meta in header.items():
        _check_entry(file, tensor, meta)
    _check_tiling(file, header, size, 8 + n)
    for meta in header.values():
        meta["start"] = 8 + n + meta["data_offsets"][0]
    return header


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
    at, before = 0, "the header"
    for tensor, meta in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = meta["data_offsets"]
        if begin != at:
            how = f"overlaps {before}" if begin < at else f"leaves {begin - at} bytes after {before} no tensor holds"
            raise CheckpointError(f"{file}: corrupt safetensors header: {tensor!r} data_offsets {[begin, end]} {how} "
                                  f"(tensors must tile the data, each starting where the one before ends at {at})")
        at, before = end, repr(tensor)
    if data + at > size:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, tensors need {data + at}: "
                              f"{before} ends past the file's end)")
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
