"""Raw tensor <-> protobuf `Tensor` codec (no pickling); the gRPC options live in rpc.options (re-exported)."""

from __future__ import annotations

import math
import sys
import warnings

import torch

from elasticmoe.rpc.experts_pb2 import Tensor
from elasticmoe.rpc.options import (GRPC_OPTIONS, GRPC_SERVER_OPTIONS, HTTP2_OPTIONS, HTTP2_TUNING,  # noqa: F401
                                    MALLOC_ENV, MAX_MESSAGE_BYTES, MiB, channel_options, server_options,
                                    tune_malloc)

if sys.byteorder != "little":  # the wire format is little-endian raw memory
    raise ImportError("elasticmoe.rpc.codec supports little-endian hosts only")

# dtype name on the wire (torch's name without "torch.") -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# torch.frombuffer warns about read-only buffers (protobuf hands out immutable bytes) once per
# process (TORCH_WARN_ONCE); decoded tensors are documented read-only views, so spend that one
# warning here, silenced, instead of in the first decode_tensor call.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)

def encode_tensor(t: torch.Tensor, out: Tensor | None = None) -> Tensor:
    """Any-device tensor of a DTYPES dtype -> Tensor message (C-contiguous little-endian bytes).

    Copies once to make it contiguous on the CPU if needed, once into `bytes`, and protobuf copies
    that into the message. Fills `out` in place when given (e.g. `request.hidden`), else a new one.
    Raises ValueError for a dtype not in DTYPES.
    """
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise ValueError(f"encode_tensor: dtype {t.dtype} is not supported (one of {sorted(DTYPES)})")
    flat = t.detach().reshape(-1)  # a view when already contiguous
    if flat.device.type != "cpu":
        flat = flat.cpu()
    # uint8 view works for every dtype incl. bfloat16 (numpy has none); bool is 1 byte already.
    raw = flat.contiguous().view(torch.uint8).numpy().tobytes()
    msg = Tensor() if out is None else out
    msg.data = raw
    msg.dtype = name
    del msg.shape[:]
    msg.shape.extend(t.shape)
    return msg


def decode_tensor(msg: Tensor, field: str = "tensor", copy: bool = False) -> torch.Tensor:
    """Tensor message -> CPU torch.Tensor of msg.shape and msg.dtype.

    Zero-copy by default: the result is a read-only view of the message's bytes (writing to it is
    undefined behaviour); pass copy=True (or .clone()) for a writable tensor it owns.
    Raises ValueError naming `field` (e.g. "RunExpertsRequest.hidden") for an unknown dtype, a
    negative dimension, or a data length other than numel * itemsize.
    """
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValueError(f"{field}.dtype: unknown dtype {msg.dtype!r} (expected one of {sorted(DTYPES)})")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"{field}.shape: negative dimension in {list(shape)}")
    data = msg.data
    itemsize = dtype.itemsize
    numel = math.prod(shape)
    if len(data) != numel * itemsize:
        raise ValueError(f"{field}.data: {len(data)} bytes, expected {numel * itemsize} "
                         f"for shape {list(shape)} of {msg.dtype} ({itemsize} bytes per element)")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(data, dtype=dtype).view(shape)
    return t.clone() if copy else t
