"""elasticmoe's gRPC layer: generated stubs (generation_pb2*, experts_pb2*), tensor codec, options."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public names -> defining submodule. Resolved lazily (PEP 562) so that `python -m
# elasticmoe.rpc.generate` neither imports torch nor needs the generated code to be importable.
_EXPORTS: dict[str, str] = {
    "encode_tensor": "codec",
    "decode_tensor": "codec",
    "channel_options": "options",
    "server_options": "options",
    "GRPC_OPTIONS": "options",
    "GRPC_SERVER_OPTIONS": "options",
    "MAX_MESSAGE_BYTES": "options",
    "DTYPES": "codec",
    "DTYPE_NAMES": "codec",
    "MALLOC_ENV": "options",
    "tune_malloc": "options",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from elasticmoe.rpc.codec import (DTYPE_NAMES, DTYPES, GRPC_OPTIONS, GRPC_SERVER_OPTIONS,
                                      MALLOC_ENV, MAX_MESSAGE_BYTES, channel_options,
                                      decode_tensor, encode_tensor, server_options, tune_malloc)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
