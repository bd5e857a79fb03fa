"""The frames' value types: a request before encoding (ExpertRequest), decoded requests and replies, FrameError."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.codec import DTYPES, decode_tensor, encode_tensor


class FrameError(ValueError):
    """A frame that cannot be read; `frame_id` is its id when the header was readable, else 0."""

    def __init__(self, message: str, frame_id: int = 0):
        super().__init__(message)
        self.frame_id = frame_id


class WireTensor(NamedTuple):
    """A tensor's place in a frame: as a protobuf `Tensor` to codec.decode_tensor (data, dtype name, shape)."""

    data: memoryview
    dtype: str
    shape: tuple[int, ...]


def as_tensor(msg: "WireTensor | pb.Tensor", field: str = "tensor") -> torch.Tensor:
    """codec.decode_tensor, but a decoded frame's 2-dim tensor is read without its checks again (the frame decoder
    proved its dtype, dims and byte count) and viewed with its dims as arguments (a shape tuple costs torch's parser
    twice as much): 9 us -> 4 us a tensor in a loop, per answer and per request on the hot path. A read-only view of
    the frame's bytes either way."""
    if type(msg) is not WireTensor or len(msg.shape) != 2 or not msg.shape[0] or not msg.shape[1]:
        return decode_tensor(msg, field)
    rows, cols = msg.shape
    return torch.frombuffer(msg.data, dtype=DTYPES[msg.dtype]).view(rows, cols)


class Request(NamedTuple):
    """A decoded request frame; reads as a RunExpertsRequest (layer, hidden, topk_ids, ...) to the shard."""

    id: int
    layer: int
    placement_version: int
    step: int
    hidden: WireTensor
    topk_ids: WireTensor
    topk_weights: WireTensor
    duplicate: bool = False  # the DUPLICATE flag (RunExpertsRequest.duplicate)


class Reply(NamedTuple):
    """A decoded reply frame; reads as a RunExpertsResponse (output, missing, compute_us, ...) to the gateway."""

    id: int
    code: int  # a grpc.StatusCode value; 0 OK
    error: str
    output: WireTensor | None
    missing: list[int]
    compute_us: int
    placement_version: int


Tensorish = Union[torch.Tensor, WireTensor]


class ExpertRequest(NamedTuple):
    """One RunExperts call's tensors, before any encoding: each transport writes them its own way."""

    layer: int
    hidden: torch.Tensor  # [T, H] in the model dtype
    topk_ids: torch.Tensor  # [T, k] int32
    topk_weights: torch.Tensor  # [T, k] float32
    placement_version: int = 0
    step: int = 0
    duplicate: bool = False  # a hedge or a re-send whose slots another call counts (RunExpertsRequest.duplicate)

    def to_proto(self) -> pb.RunExpertsRequest:
        return pb.RunExpertsRequest(layer=self.layer, hidden=encode_tensor(self.hidden),
                                    topk_ids=encode_tensor(self.topk_ids),
                                    topk_weights=encode_tensor(self.topk_weights),
                                    placement_version=self.placement_version, step=self.step,
                                    duplicate=self.duplicate)


AnyRequest = Union[ExpertRequest, pb.RunExpertsRequest]


def as_proto(req: AnyRequest) -> pb.RunExpertsRequest:
    return req.to_proto() if isinstance(req, ExpertRequest) else req
