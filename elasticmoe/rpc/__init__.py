"""elasticmoe's gRPC layer: generated stubs (generation_pb2*, experts_pb2*), tensor codec, options."""

from __future__ import annotations

from typing import TYPE_CHECKING

from elasticmoe.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
