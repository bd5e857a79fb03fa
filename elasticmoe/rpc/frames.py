"""RunExpertsStream's raw frames: a fixed little-endian header, then the tensors' bytes as they are in memory.

On the wire each frame is a protobuf `ExpertFrame` whose 8-byte prefix is written here: `align` (field 15) = 0, then
field 1's tag and its length as a 5-byte varint, so the payload starts 8-aligned and any protobuf parser reads it too;
readers take any encoding of ExpertFrame (other writers' cost one parse copy).
Payload layout (experts.proto documents the same):

    HEADER (40 bytes)  magic "EMF1", kind (1 request, 2 reply), flags (request: DUPLICATE; else 0; bits 0-3 hints
                       a reader ignores when it does not know them, bits 4-7 refused then), tensor count, 1 pad byte,
                       id u64, layer (request) or status code (reply) i32, error text length u32,
                       placement_version i64, step (request) or compute_us (reply) u64
    DESC x count       (24 bytes each) dtype code u8, ndim u8 (0..2), 6 pad bytes, dim0 i64, dim1 i64
    error text         UTF-8 (replies with a code only), padded to 8 bytes
    tensor bytes       C-contiguous, each padded to 8 bytes
A request carries hidden [T, H] (model dtype), topk_ids [T, k], topk_weights [T, k]; an OK reply carries output
[T, H] (whatever dtype the shard computed) and missing [m] int32; a failed reply carries no tensor, only its text.
"""

from __future__ import annotations

import array
import ctypes
import functools
import struct

import torch
from google.protobuf.message import DecodeError

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.codec import DTYPES
from elasticmoe.rpc.frame_types import (  # noqa: F401 - the frames' types, read as frames.X
    AnyRequest, ExpertRequest, FrameError, Reply, Request, Tensorish, WireTensor, as_proto)
from elasticmoe.rpc.options import MAX_MESSAGE_BYTES

MAGIC = b"EMF1"
REQUEST, REPLY = 1, 2
DUPLICATE = 1  # a request's flags bit: RunExpertsRequest.duplicate (readers that predate it ignore the flags)
# The flags' bits 0-3 are hints (DUPLICATE): a reader that does not know one ignores it. Bits 4-7 change what a frame's
# tensors mean: a reader that does not know one set refuses the frame (FrameError naming it) rather than read the
# tensors as if it were not (wrong sums). A change of the layout itself changes MAGIC (refused alike, both named).
HINT_FLAGS, REQUIRED_FLAGS = 0x0F, 0xF0
KNOWN_REQUIRED = 0  # the required bits this release reads: none yet
HEADER = struct.Struct("<4sBBBxQiIqQ")
DESC = struct.Struct("<BB6xqq")
_PREFIX = 8  # align = 0 (2 bytes), field 1's tag, its length as a 5-byte varint
_MAX_LEN = (1 << 32) - 1
LIMIT = min(MAX_MESSAGE_BYTES, _MAX_LEN)  # the largest frame written, prefix included: what gRPC and the listener take
BUSY = "shard busy"  # the start of a full shard's RESOURCE_EXHAUSTED message: alive, ask again or another copy
OVERSIZE = "over the shard's message limit"  # the start of a frame's failure, not sent: larger than the shard takes
OUT_OF_MEMORY = "shard out of memory"  # the start of a RunExperts RESOURCE_EXHAUSTED whose tokens did not fit
_OVERHEAD = 4096  # a call's bytes besides its tensors' (prefix, header, descriptors; a unary call's fields: fewer)
_FAST = b"\x78\x00\x0a"  # align (field 15) = 0, then field 1's tag
# dtype code on the wire -> dtype name (codec.DTYPES); codes are fixed, never renumbered.
CODES: dict[int, str] = {1: "float32", 2: "float16", 3: "bfloat16", 4: "float64", 5: "int64", 6: "int32",
                         7: "int16", 8: "int8", 9: "uint8", 10: "bool"}
_CODE_OF = {name: code for code, name in CODES.items()}
_TORCH_CODE = {DTYPES[name]: code for code, name in CODES.items()}  # torch dtype -> code
_ITEMSIZE = {code: DTYPES[name].itemsize for code, name in CODES.items()}


def request_frame(frame_id: int, req: AnyRequest) -> bytes:
    """encode_request for an ExpertRequest or a RunExpertsRequest message (its tensors' bytes as they are)."""
    return b"".join(request_parts(frame_id, req))


def _raw(t: Tensorish) -> tuple:
    """(dtype code, shape, bytes[, the tensor the bytes belong to]) of a CPU tensor or a WireTensor, without copying
    a contiguous tensor."""
    if type(t) is WireTensor:
        code = _CODE_OF.get(t.dtype)
        if code is None or len(t.shape) > 2:
            raise ValueError(f"frame tensor: dtype {t.dtype!r}, shape {list(t.shape)}; want a codec dtype, <= 2 dims")
        data = t.data
        return code, t.shape, data if type(data) is memoryview and data.format == "B" else memoryview(data).cast("B")
    code = _TORCH_CODE.get(t.dtype)
    if code is None or t.dim() > 2:
        raise ValueError(f"frame tensor: dtype {t.dtype}, {t.dim()} dims; want a codec dtype and at most 2 dims")
    if not t.is_cpu or t.requires_grad or not t.is_contiguous():
        t = t.detach().cpu().contiguous()
    n = t.nbytes
    if not n:
        return code, tuple(t.shape), memoryview(b"")
    # the tensor's bytes in place (no copy, any dtype); the frame's Parts keep the tensor alive
    return code, t.shape, memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())), t


_PADS = [b"\0" * i for i in range(8)]


def _varint5(size: int) -> bytes:
    """The prefix: align = 0, field 1's tag, then `size` as a 5-byte varint (so the payload starts 8-aligned)."""
    return _FAST + bytes((size & 0x7F | 0x80, size >> 7 & 0x7F | 0x80, size >> 14 & 0x7F | 0x80,
                          size >> 21 & 0x7F | 0x80, size >> 28 & 0x7F))


def _frame(kind: int, frame_id: int, word: int, text: bytes, version: int, last: int, tensors: list,
           flags: int = 0) -> bytes:
    """Prefix, header, descriptors, text and tensor bytes joined into one bytes object (the payload's one copy)."""
    return b"".join(_parts(kind, frame_id, word, text, version, last, tensors, flags))


def _parts(kind: int, frame_id: int, word: int, text: bytes, version: int, last: int, tensors: list,
           flags: int = 0) -> list:
    """A frame as a list of byte buffers: prefix + header + descriptors + text in one, then each tensor's bytes
    (views of the tensors: no copy yet) and its padding where it needs some. (The hot path of every call, both
    ways: a plain contiguous CPU tensor is read inline, anything else through _raw.)"""
    fields = [MAGIC, kind, flags, len(tensors), frame_id, word, len(text), version, last]
    body, keep, size = [], [], 0
    for t in tensors:
        if type(t) is torch.Tensor and (code := _TORCH_CODE.get(t.dtype)) is not None and t.is_cpu \
                and not t.requires_grad and t.is_contiguous() and (ndim := t.dim()) <= 2:
            shape, n = t.shape, t.nbytes
            if n:  # the tensor's bytes in place (no copy, any dtype); the frame's Parts keep the tensor alive
                body.append((ctypes.c_ubyte * n).from_address(t.data_ptr()))
                keep.append(t)
        else:
            code, shape, data, *owner = _raw(t)
            keep += owner
            ndim, n = len(shape), len(data)
            if n:
                body.append(data)
        fields += (code, ndim, shape[0] if ndim else 0, shape[1] if ndim == 2 else 0)
        if n % 8:
            body.append(_PADS[-n % 8])
        size += n + (-n % 8)
    head = _with_descs(len(tensors)).pack(*fields)
    if text:
        head += text + _PADS[-len(text) % 8]
    size += len(head)
    if _PREFIX + size > LIMIT:  # the receiver would end the whole connection (gRPC or the listener): fail this one
        raise ValueError(f"frame: {_PREFIX + size} bytes, more than the {LIMIT}-byte message limit "
                         f"(ELASTICMOE_GRPC_MAX_MESSAGE_BYTES)")
    parts = Parts((_varint5(size) + head, *body))
    parts.keep = keep
    return parts


class Parts(list):
    """A frame as byte buffers (for socket.sendmsg or b"".join); `keep` holds the tensors whose memory some of the
    buffers are (views by address, which do not keep them alive themselves)."""

    keep: list


def max_rows(hidden_size: int, top_k: int, hidden_itemsize: int, output_itemsize: int, limit: int = LIMIT) -> int:
    """The most tokens one shard call can carry, its request (hidden [T, H] at hidden_itemsize bytes a value, ids and
    weights [T, k] at 4) and its reply (output [T, H] at output_itemsize) each within `limit` bytes."""
    per_token = max(hidden_size * hidden_itemsize + 8 * top_k, hidden_size * output_itemsize)
    return max(0, (limit - _OVERHEAD) // per_token)


def request_parts(frame_id: int, req: AnyRequest) -> list:
    """request_frame's bytes as a list of buffers (for socket.sendmsg: the tensors are not copied)."""
    if isinstance(req, ExpertRequest):
        tensors = [req.hidden, req.topk_ids, req.topk_weights]
    else:
        tensors = [WireTensor(m.data, m.dtype, tuple(m.shape)) for m in (req.hidden, req.topk_ids, req.topk_weights)]
    return _parts(REQUEST, frame_id, req.layer, b"", req.placement_version, req.step, tensors,
                  DUPLICATE if req.duplicate else 0)


def reply_parts(frame_id: int, output: Tensorish | None = None, missing: list[int] = (), compute_us: int = 0,
                placement_version: int = 0, code: int = 0, error: str = "") -> list:
    """encode_reply's bytes as a list of buffers (the output tensor is not copied)."""
    if code:
        return _parts(REPLY, frame_id, code, error.encode(), placement_version, 0, [])
    if output is None:  # all missing: no rows computed
        output = WireTensor(memoryview(b""), "float32", (0, 0))
    ids = array.array("i", missing)  # int32, little-endian (codec: little-endian hosts only)
    return _parts(REPLY, frame_id, 0, b"", placement_version, compute_us,
                  [output, WireTensor(memoryview(ids).cast("B"), "int32", (len(ids),))])


def frame_size(prefix: bytes | memoryview) -> int:
    """The length of the frame whose 8-byte prefix (as this module writes it) is `prefix`; on a byte stream this
    prefix is the frame's length prefix. FrameError for anything else (the stream cannot be resynchronised)."""
    size = _size8(prefix) if len(prefix) == _PREFIX else -1
    if size < 0:
        raise FrameError(f"frame prefix {bytes(prefix).hex()}: not an ExpertFrame length prefix")
    return size


_FAST_INT = int.from_bytes(_FAST, "little")


def _size8(prefix) -> int:
    """The frame length in an 8-byte prefix as this module writes it (_FAST, then a 5-byte varint with continuation
    bits on its first 4 bytes), read as one integer; else -1."""
    p = int.from_bytes(prefix[:_PREFIX], "little")
    v = p >> 24
    if p & 0xFFFFFF != _FAST_INT or v & 0x8080808080 != 0x80808080:
        return -1
    return v & 0x7F | v >> 1 & 0x3F80 | v >> 2 & 0x1FC000 | v >> 3 & 0xFE00000 | v >> 4 & 0x7F0000000


def encode_request(frame_id: int, layer: int, hidden: Tensorish, topk_ids: Tensorish, topk_weights: Tensorish,
                   placement_version: int = 0, step: int = 0, duplicate: bool = False) -> bytes:
    """A request frame: hidden [T, H] stays in its dtype (bf16 is 2 bytes a value), ids [T, k], weights [T, k]."""
    return _frame(REQUEST, frame_id, layer, b"", placement_version, step, [hidden, topk_ids, topk_weights],
                  DUPLICATE if duplicate else 0)


def encode_reply(frame_id: int, output: Tensorish | None = None, missing: list[int] = (), compute_us: int = 0,
                 placement_version: int = 0, code: int = 0, error: str = "") -> bytes:
    """An OK reply (output [T, H] in its dtype, missing ids) or, with a code, a failure and its message."""
    return b"".join(reply_parts(frame_id, output, missing, compute_us, placement_version, code, error))


@functools.lru_cache(maxsize=None)
def _with_descs(count: int) -> struct.Struct:
    """The header and `count` tensor descriptors, unpacked at once."""
    return struct.Struct(HEADER.format + DESC.format[1:] * count)


def _payload(buf: bytes) -> memoryview:
    """The frame bytes of an ExpertFrame message: a view past our 8-byte prefix, else (any other writer) parsed."""
    view = memoryview(buf)
    if len(view) >= _PREFIX and _size8(view) == len(view) - _PREFIX:
        return view[_PREFIX:]
    try:
        return memoryview(pb.ExpertFrame.FromString(buf).frame)
    except DecodeError:
        raise FrameError(f"frame: {len(view)} bytes that are not an ExpertFrame message") from None


def _parse(buf: bytes, kind: int) -> tuple[tuple, list[WireTensor], str]:
    """Header fields, tensors (views of buf) and error text of one frame; FrameError naming what is wrong."""
    view = _payload(buf)
    size = len(view)
    if size < HEADER.size:
        raise FrameError(f"frame: {size} bytes, shorter than the {HEADER.size}-byte header")
    count = view[6]
    off = HEADER.size + count * DESC.size
    if size < off:
        frame_id = HEADER.unpack_from(view, 0)[4]
        raise FrameError(f"frame {frame_id}: {size} bytes, too short for {count} tensors", frame_id)
    fields = _with_descs(count).unpack_from(view, 0)
    magic, got_kind, flags, count, frame_id, _, text_len = fields[:7]  # the header's 9 fields, then 4 per tensor
    if magic != MAGIC or got_kind != kind:
        if magic != MAGIC and magic[:3] == MAGIC[:3]:
            raise FrameError(f"frame {frame_id}: frame format {bytes(magic)!r}; this release reads {MAGIC!r} only "
                             f"(a peer of another release)", frame_id)
        raise FrameError(f"frame {frame_id}: magic {bytes(magic)!r} kind {got_kind}, want {MAGIC!r} kind {kind}",
                         frame_id)
    if flags & REQUIRED_FLAGS & ~KNOWN_REQUIRED:
        raise FrameError(f"frame {frame_id}: flags {flags:#04x}: bits {flags & REQUIRED_FLAGS & ~KNOWN_REQUIRED:#04x} "
                         f"change what its tensors mean and this release does not read them (a peer of a newer "
                         f"release); refused unread", frame_id)
    if size < off + text_len:
        raise FrameError(f"frame {frame_id}: {size} bytes, too short for its {text_len}-byte error text", frame_id)
    text = ""
    if text_len:
        text = bytes(view[off:off + text_len]).decode(errors="replace")
        off += text_len + (-text_len % 8)
    tensors = []
    for i in range(9, 9 + 4 * count, 4):
        code, ndim, d0, d1 = fields[i:i + 4]
        itemsize = _ITEMSIZE.get(code)
        if itemsize is None or ndim > 2 or d0 < 0 or d1 < 0:
            raise FrameError(f"frame {frame_id}: tensor {i // 4 - 2}: dtype code {code}, ndim {ndim}, dims "
                             f"{[d0, d1][:ndim]} (codes {sorted(CODES)}, at most 2 non-negative dims)", frame_id)
        if ndim == 2:
            shape, n = (d0, d1), d0 * d1 * itemsize
        else:
            shape, n = ((d0,), d0 * itemsize) if ndim else ((), itemsize)
        end = off + n
        if end > size:
            raise FrameError(f"frame {frame_id}: tensor {i // 4 - 2} {list(shape)} {CODES[code]} needs {n} bytes at "
                             f"{off}, the frame has {size}", frame_id)
        tensors.append(WireTensor(view[off:end], CODES[code], shape))
        off = end + (-n % 8)
    if off != size:
        raise FrameError(f"frame {frame_id}: {size} bytes, its header describes {off}", frame_id)
    return fields[:9], tensors, text


def decode_request(buf: bytes) -> Request:
    """A request frame -> Request (tensors are read-only views of buf); FrameError if malformed."""
    head, tensors, _ = _parse(buf, REQUEST)
    if len(tensors) != 3:
        raise FrameError(f"frame {head[4]}: {len(tensors)} tensors, a request has 3", head[4])
    return Request(head[4], head[5], head[7], head[8], *tensors, bool(head[2] & DUPLICATE))


def decode_request_or_error(buf: bytes) -> Request | FrameError:
    """As decode_request, but a malformed frame comes back as its FrameError (so one bad frame fails alone)."""
    try:
        return decode_request(buf)
    except FrameError as e:
        return e


def decode_reply(buf: bytes) -> Reply:
    """A reply frame -> Reply (output a view of buf); FrameError if malformed."""
    head, tensors, text = _parse(buf, REPLY)
    frame_id, code = head[4], head[5]
    if code:
        return Reply(frame_id, code, text, None, [], 0, head[7])
    if len(tensors) != 2 or tensors[1].dtype != "int32" or len(tensors[1].shape) != 1:
        got = ", ".join(f"{t.dtype} {list(t.shape)}" for t in tensors)
        raise FrameError(f"frame {frame_id}: an OK reply has output [T, H] and int32 missing [m]; got {got}", frame_id)
    missing = torch.frombuffer(tensors[1].data, dtype=torch.int32).tolist() if tensors[1].shape[0] else []  # [m]
    return Reply(frame_id, 0, "", tensors[0], missing, head[8], head[7])
