"""Lazy, per-tensor reads of a (sharded) safetensors checkpoint, with clear errors naming the file or field."""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or field at fault."""


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A checkpoint directory from a path, an HF cache repo dir (`models--org--name`) or a cached repo id."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "snapshots").is_dir():
        path = _latest_snapshot(path / "snapshots")
    if not path.exists() and "/" in str(model) and not str(model).startswith(("/", ".")):
        cache = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", "~/.cache/huggingface"))
                                    .expanduser() / "hub"))
        repo = cache / ("models--" + str(model).replace("/", "--"))
        if (repo / "snapshots").is_dir():
            path = _latest_snapshot(repo / "snapshots")
    if not path.is_dir():
        raise CheckpointError(f"{model}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path / 'config.json'}: missing (not a Hugging Face checkpoint directory)")
    return path


def _latest_snapshot(snapshots: Path) -> Path:
    dirs = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not dirs:
        raise CheckpointError(f"{snapshots}: the HF cache holds no snapshot")
    return dirs[-1]


def read_header(file: Path) -> dict[str, Any]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
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
        raise CheckpointError(f"{file}: missing (named by the checkpoint index)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return header


@dataclass(frozen=True)
class View:
    """A tensor exposed under a family-neutral name: rows [start, stop) of a stored one, optionally transposed."""

    stored: str
    rows: tuple[int, int] | None = None
    transpose: bool = False


class Checkpoint:
    """A checkpoint directory: its config and tensor index; tensors are read one at a time, on demand.

    `tensors_read` and `bytes_read` count what was actually read, so tests can prove a process loads
    only its share (the dense half, or some experts).
    """

    def __init__(self, model: str | os.PathLike):
        self.path = resolve_model_dir(model)
        self.weight_map: dict[str, str] = {}  # tensor name -> file name
        self._meta: dict[str, dict[str, Any]] = {}  # tensor name -> {dtype, shape}
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._views: dict[str, View] = {}  # exposed name -> where it is stored (see set_views)
        self._covered: set[str] = set()  # stored names shown only through views
        self.tensors_read = 0
        self.bytes_read = 0
        self._index()

    def _index(self) -> None:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: corrupt index (needs a 'weight_map' object): {e}") from e
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        for name in files:
            for tensor, meta in read_header(self.path / name).items():
                self.weight_map[tensor] = name
                self._meta[tensor] = meta

    def config(self) -> Any:
        """The transformers config; an unknown architecture raises CheckpointError naming config.json."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{self.path / 'config.json'}: unknown or unreadable architecture: {e}") from e

    def set_views(self, views: dict[str, View], ignored: set[str] = frozenset()) -> None:
        """Expose stored tensors (or row slices of them) under other names; the stored names they cover vanish,
        and so do `ignored` ones (weights that transformers allocates but never uses)."""
        for v in views.values():
            self._require(v.stored)
        self._views = dict(views)
        self._covered = {v.stored for v in views.values()} | set(ignored)

    def names(self) -> list[str]:
        return [n for n in self.weight_map if n not in self._covered] + list(self._views)

    def __contains__(self, name: str) -> bool:
        return name in self._views or (name in self.weight_map and name not in self._covered)

    def shape(self, name: str) -> tuple[int, ...]:
        v = self._views.get(name)
        if v is None:
            return tuple(self._require(name)["shape"])
        shape = list(self._require(v.stored)["shape"])
        if v.rows is not None:
            shape[0] = v.rows[1] - v.rows[0]
        return tuple(reversed(shape)) if v.transpose else tuple(shape)

    def _require(self, name: str) -> dict[str, Any]:
        if name not in self._meta:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return self._meta[name]

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        with self._lock:
            if file not in self._handles:
                try:
                    self._handles[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
                except Exception as e:  # safetensors raises its own error types
                    raise CheckpointError(f"{self.path / file}: cannot open: {e}") from e
            return self._handles[file]

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or one row `index` of its first dim, read alone), as stored on disk (views: as exposed)."""
        v = self._views.get(name)
        if v is not None:
            t = self._read(v.stored, slice(*v.rows) if v.rows is not None else None)
            t = t.t() if v.transpose else t
            return t if index is None else t[index]
        return self._read(name, index)

    def _read(self, name: str, index: int | slice | None) -> torch.Tensor:
        meta = self._require(name)
        handle = self._handle(self.weight_map[name])
        try:
            t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read {name!r}: {e}") from e
        expected = _DTYPES.get(meta["dtype"])
        if expected is not None and t.dtype != expected:
            raise CheckpointError(f"{self.weight_map[name]}: {name!r} read as {t.dtype}, header says {expected}")
        with self._lock:
            self.tensors_read += 1
            self.bytes_read += t.numel() * t.element_size()
        return t
