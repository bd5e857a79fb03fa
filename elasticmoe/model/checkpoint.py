"""Lazy, per-tensor reads of a (sharded) safetensors checkpoint, with clear errors naming the file or field.

Tensors are read with plain positional file reads at the offsets the safetensors header gives (no mmap): a
process's memory holds what it keeps, and the page cache, not the process, holds the file. Block-FP8 weights
come back dequantized (see model.quant)."""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elasticmoe.model.open_files import OpenFiles
from elasticmoe.model.quant import (
    FP8_DTYPES, FP8_SCALE_SUFFIX, QuantError, dequant_fp8, fp8_scale_float, fp8_scale_shape, quant_format,
)
from elasticmoe.model.safetensors_header import _DTYPES, CheckpointError, read_header, same_tensor
from elasticmoe.model.weight_files import INDEX_FILE, weight_files

__all__ = ["INDEX_FILE", "Checkpoint", "CheckpointError", "View", "load_config", "read_header", "resolve_model_dir"]


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A checkpoint directory from a path, an HF cache repo dir (`models--org--name`) or a cached repo id: the
    snapshot refs/main names, as the served app pins it (model.hub.resolve), never the newest by mtime."""
    from elasticmoe.model.hub import HubError, resolve

    try:
        path = resolve(str(model)).path
    except HubError as e:
        raise CheckpointError(str(e)) from e
    return path  # resolve refused a directory without config.json


def load_config(path: Path) -> Any:
    """The transformers config of checkpoint directory `path` (its config.json only); an unknown architecture raises
    CheckpointError naming config.json."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except StrictDataclassError as e:  # a field of a type its config class forbids (e.g. null for an int)
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unknown or unreadable architecture: {e}") from e


@dataclass(frozen=True)
class View:
    """A tensor exposed under a family-neutral name: rows [start, stop) of a stored one, optionally transposed."""

    stored: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    squeeze: bool = False  # one row of a stacked tensor without its first dim (Step-3.7's experts [E, I, H])


class Checkpoint:
    """A checkpoint directory: its config and tensor index; tensors are read one at a time, on demand.

    `tensors_read` and `bytes_read` count what was actually read (bytes on disk), so tests can prove a process
    loads only its share (the dense half, or some experts).
    """

    def __init__(self, model: str | os.PathLike):
        self.path = resolve_model_dir(model)
        self.weight_map: dict[str, str] = {}  # tensor name -> file name
        self._meta: dict[str, dict[str, Any]] = {}  # tensor name -> {dtype, shape, start, data_offsets}
        self._files = OpenFiles(self.path)  # each checked to hold the header read at open, before each read
        self._lock = threading.Lock()
        self._views: dict[str, View] = {}  # exposed name -> where it is stored (see set_views)
        self._covered: set[str] = set()  # stored names shown only through views
        self.tensors_read = 0
        self.bytes_read = 0
        self.index_file: Path | None = None  # the index listing the files read (None: one file)
        raw = self._raw_config()
        self._index(raw)
        self.quant = quant_format(raw, self.path / "config.json")
        self._scales = self._fp8_scales() if self.quant.method == "fp8" else {}  # weight -> its weight_scale_inv
        self._scale_names = set(self._scales.values())

    def _index(self, config: dict[str, Any]) -> None:
        """Headers of the files transformers would load (model.weight_files), merged; a tensor in two of them
        must be the same bytes. As transformers 5.x, every tensor of those files loads, the index naming it or not,
        from whichever of them holds it (the index's placement is only checked to be somewhere)."""
        chosen = weight_files(self.path, config)
        self.index_file = chosen.index
        files = chosen.files
        headers = {name: self._files.read_header(name) for name in files}
        for tensor, name in chosen.placed.items():
            if tensor not in headers[name] and not any(tensor in h for h in headers.values()):
                raise CheckpointError(f"{self.path / name}: has no tensor {tensor!r}, which {chosen.index.name} "
                                      f"places there (nor has any other file it lists)")
        for name in files:
            for tensor, meta in headers[name].items():
                first = self.weight_map.get(tensor)
                if first is not None and not same_tensor(self.path / first, self._meta[tensor], self.path / name, meta):
                    raise CheckpointError(f"{self.path}: tensor {tensor!r} is stored in both {first} and {name}, "
                                          f"differently (which one is meant is unclear): remove one copy")
                self.weight_map[tensor] = name
                self._meta[tensor] = meta

    def _raw_config(self) -> dict[str, Any]:
        """config.json as JSON (a non-object as {}: the transformers config reports it)."""
        config_file = self.path / "config.json"
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file}: not valid JSON: {e}") from e
        return raw if isinstance(raw, dict) else {}

    def _fp8_scales(self) -> dict[str, str]:
        """Each FP8 weight's scale tensor, checked against its shape; the scales are then hidden from names()."""
        scales = {}
        for name, meta in self._meta.items():
            if meta["dtype"] not in FP8_DTYPES:
                continue
            scale = name + FP8_SCALE_SUFFIX
            if scale not in self._meta:
                raise QuantError(f"{self.path / self.weight_map[name]}: FP8 tensor {name!r} has no {scale!r} beside it")
            if self.quant.block is not None and len(meta["shape"]) < 2:
                raise QuantError(f"{self.path / self.weight_map[name]}: FP8 tensor {name!r} is {meta['shape']}, but "
                                 f"block-scaled weights are [..., rows, cols]")
            want = fp8_scale_shape(tuple(meta["shape"]), self.quant.block)
            got = tuple(self._meta[scale]["shape"])
            if got != want and not (self.quant.block is None and got in ((1,), ())):
                raise QuantError(f"{self.path / self.weight_map[scale]}: {scale!r} is {list(got)}, want {list(want)} "
                                 f"for {name!r} {meta['shape']} in blocks of {self.quant.block} (config.json)")
            scales[name] = scale
        return scales

    def config(self) -> Any:
        """The transformers config (load_config)."""
        return load_config(self.path)

    def set_views(self, views: dict[str, View], ignored: set[str] = frozenset()) -> None:
        """Expose stored tensors (or row slices of them) under other names; the stored names they cover vanish,
        and so do `ignored` ones (weights that transformers allocates but never uses)."""
        for v in views.values():
            self._require(v.stored)
        self._views = dict(views)
        self._covered = {v.stored for v in views.values()} | set(ignored)

    def names(self) -> list[str]:
        """Tensor names as the model sees them: FP8 scales are part of their weight, not names of their own."""
        hidden = self._covered | self._scale_names
        return [n for n in self.weight_map if n not in hidden] + list(self._views)

    def __contains__(self, name: str) -> bool:
        if name in self._views:
            return True
        return name in self.weight_map and name not in self._covered and name not in self._scale_names

    def file_of(self, name: str) -> Path:
        """The safetensors file holding tensor `name` (a view's: its stored tensor's), for error messages."""
        v = self._views.get(name)
        return self.path / self.weight_map.get(v.stored if v is not None else name, "")

    def shape(self, name: str) -> tuple[int, ...]:
        v = self._views.get(name)
        if v is None:
            return tuple(self._require(name)["shape"])
        shape = list(self._require(v.stored)["shape"])
        if v.rows is not None:
            shape[0] = v.rows[1] - v.rows[0]
        shape = shape[1:] if v.squeeze else shape
        return tuple(reversed(shape)) if v.transpose else tuple(shape)

    def dtype(self, name: str) -> str:
        """The safetensors dtype (F32, BF16, F8_E4M3, I32, ...) tensor `name` is stored in (a view's: its stored's)."""
        v = self._views.get(name)
        return self._require(v.stored if v is not None else name)["dtype"]

    def _require(self, name: str) -> dict[str, Any]:
        if name not in self._meta:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return self._meta[name]

    def close(self) -> None:
        """Close the files (reads reopen them)."""
        self._files.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may be gone
            pass

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """One tensor (or one row `index` of its first dim, read alone), as stored on disk (views: as exposed);
        FP8 weights dequantized to float32 with their scales."""
        v = self._views.get(name)
        if v is not None:
            if v.stored in self._scales:  # rows of a block-scaled weight: dequantize it whole, then slice
                t = self._read(v.stored, None)
                t = t[slice(*v.rows)] if v.rows is not None else t
            else:
                t = self._read(v.stored, slice(*v.rows) if v.rows is not None else None)
            t = t[0] if v.squeeze else t
            t = t.t() if v.transpose else t
            return t if index is None else t[index]
        return self._read(name, index)

    def read_weight(self, name: str, index: int | None = None) -> torch.Tensor:
        """read(name, index) of a weight, which is floating point (FP8 comes back dequantized): one stored as integers
        or bools (a header that lies about its dtype) raises CheckpointError naming it, not converted to numbers."""
        t = self.read(name, index)
        if not t.is_floating_point():
            stored = self._views[name].stored if name in self._views else name
            raise CheckpointError(f"{self.file_of(stored)}: {name!r} is stored as {self._meta[stored]['dtype']}, but "
                                  f"it is a weight (floating point)")
        return t

    def read_into(self, name: str, out: torch.Tensor, index: int | None = None) -> None:
        """read(name, index) written into `out` (same shape; any dtype, device and strides). A tensor stored in
        out's dtype goes from the file straight into a contiguous CPU `out`, with no copy between; an FP8 weight
        read into an FP8 `out` stays quantized (its scales are read apart: scale_of)."""
        meta = self._meta.get(name)
        if name not in self._views and meta is not None and _DTYPES.get(meta["dtype"]) == out.dtype:
            shape = tuple(meta["shape"][1:] if index is not None else meta["shape"])
            if shape != tuple(out.shape):
                raise CheckpointError(f"{self.path / self.weight_map[name]}: {name!r} gives a {list(shape)} tensor, "
                                      f"want {list(out.shape)}")
            if out.device.type == "cpu" and out.is_contiguous():
                self._read_raw(name, meta, index, out)
            else:
                out.copy_(self._read_raw(name, meta, index, None))
            return
        t = self.read_weight(name, index) if out.is_floating_point() else self.read(name, index)
        if tuple(t.shape) != tuple(out.shape):
            stored = self._views[name].stored if name in self._views else name
            raise CheckpointError(f"{self.file_of(stored)}: {name!r} gives a {list(t.shape)} "
                                  f"tensor, want {list(out.shape)}")
        out.copy_(t)

    def scale_of(self, name: str) -> str | None:
        """The weight_scale_inv tensor of an FP8 weight (None for other tensors)."""
        return self._scales.get(name)

    def _read(self, name: str, index: int | slice | None, out: torch.Tensor | None = None) -> torch.Tensor:
        meta = self._require(name)
        if name in self._scales and index is not None and len(meta["shape"]) <= 2:  # rows cut across scale blocks
            return self._read(name, None)[index]
        if name in self._scales:
            w = self._read_raw(name, meta, index, None)
            scale = self._read_raw(self._scales[name], self._meta[self._scales[name]], index, None)
            return dequant_fp8(w, scale, self.quant.block)
        if meta["dtype"] == "U8" and name in self._scale_names:  # E8M0 scales, read alone (kept FP8)
            return fp8_scale_float(self._read_raw(name, meta, index, None))
        if meta["dtype"] in FP8_DTYPES:
            raise QuantError(f"{self.path / self.weight_map[name]}: {name!r} is {meta['dtype']} but config.json has "
                             "no quantization_config 'fp8' to scale it (its values would be meaningless)")
        return self._read_raw(name, meta, index, out)

    def _read_raw(self, name: str, meta: dict[str, Any], index: int | slice | None,
                  out: torch.Tensor | None) -> torch.Tensor:
        """The bytes of the tensor (or of rows `index` of its first dim) at their offset in the file."""
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: {name!r} has unsupported dtype "
                                  f"{meta['dtype']}")
        shape = list(meta["shape"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        row = math.prod(shape[1:]) * itemsize if shape else itemsize
        lo, hi = 0, (shape[0] if shape else 1)
        if isinstance(index, int):
            if not -shape[0] <= index < shape[0]:
                raise CheckpointError(f"{self.path}: row {index} of {name!r} {shape} does not exist")
            lo, hi = index % shape[0], index % shape[0] + 1
            shape = shape[1:]
        elif isinstance(index, slice):
            lo, hi, _ = index.indices(shape[0])
            shape[0] = max(hi - lo, 0)
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        self._pread(name, buf, meta["start"] + lo * row, (hi - lo) * row)
        with self._lock:
            self.tensors_read += 1
            self.bytes_read += (hi - lo) * row
        return out

    def _pread(self, name: str, buf: memoryview, offset: int, size: int) -> None:
        """`size` bytes of tensor `name` at `offset` of its file into `buf`, the file checked before and after: one
        rewritten while the bytes are read (cp over it, taking seconds for a packed layer) may have given some of them
        from the new file, so the read fails as one found changed before it does (OpenFiles.fd)."""
        fd, done = self._files.fd(self.weight_map[name], name), 0
        while done < size:
            try:
                n = os.preadv(fd, [buf[done:size]], offset + done)
            except OSError as e:
                raise CheckpointError(f"{self.path / self.weight_map[name]}: cannot read {name!r}: {e}") from e
            if n == 0:
                raise CheckpointError(f"{self.path / self.weight_map[name]}: {name!r} ends early (file truncated?)")
            done += n
        self._files.fd(self.weight_map[name], name)
