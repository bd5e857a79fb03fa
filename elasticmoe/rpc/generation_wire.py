"""Reading a GenerateRequest off the wire without failing the call: what protobuf refuses comes back named."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from elasticmoe.rpc import generation_pb2 as gen

SERVICE = "elasticmoe.v1.Generation"
_STRINGS = {1: "request_id", 2: "prompt"}  # GenerateRequest's string fields (generation.proto)
_SAMPLING, _STOP = 4, 6  # GenerateRequest.sampling, SamplingParams.stop


@dataclass(frozen=True)
class Malformed:
    """A request protobuf could not parse (e.g. a string field that is not UTF-8, which proto3 forbids and some
    clients send anyway): `field` names the first bad field (`request` when no field can be told), `message` says
    how. Handed to the servicer in place of the request, so that it is refused as INVALID_ARGUMENT naming the field:
    a deserializer that raises makes gRPC answer UNKNOWN with "Unexpected <class 'DecodeError'>" instead."""

    field: str
    message: str


def read_request(data: bytes) -> gen.GenerateRequest | Malformed:
    """The request in `data`, or Malformed."""
    try:
        return gen.GenerateRequest.FromString(data)
    except DecodeError as e:
        return _malformed(bytes(data), e)


def _malformed(data: bytes, error: DecodeError) -> Malformed:
    """Which field protobuf refused: the first string field that is not UTF-8, else the wire format as a whole."""
    try:
        stops = []
        for number, wire, value in _fields(data):
            if number in _STRINGS and wire == 2:
                _utf8(_STRINGS[number], value)
            elif number == _SAMPLING and wire == 2:
                stops += [v for n, w, v in _fields(value) if n == _STOP and w == 2]
        for i, s in enumerate(stops):
            _utf8(f"stop[{i}]" if len(stops) > 1 else "stop", s)
    except _Bad as bad:
        return Malformed(bad.field, bad.message)
    except ValueError:
        pass
    return Malformed("request", f"not a valid {gen.GenerateRequest.DESCRIPTOR.full_name} ({error})")


class _Bad(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _utf8(field: str, value: bytes) -> None:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(field, f"is not valid UTF-8 (byte 0x{value[e.start]:02x} at byte offset {e.start}); proto3 "
                          f"strings must be UTF-8") from None


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[at]
        value |= (b & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not b & 0x80:
            return value, at


def _fields(data: bytes):
    """(field number, wire type, value) of each field in `data`: bytes for length-delimited ones; ValueError when
    the wire format is corrupt (then no field is named)."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
            value = None
        elif wire == 2:
            n, at = _varint(data, at)
            value, at = data[at:at + n], at + n
        else:  # groups: not in this message
            raise ValueError(f"wire type {wire}")
        if at > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def add_generation_to_server(servicer, server) -> None:
    """As generation_pb2_grpc.add_GenerationServicer_to_server, but reading requests with read_request."""
    out = gen.GenerateResponse.SerializeToString
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate, read_request, out),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(servicer.GenerateStream, read_request, out),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
