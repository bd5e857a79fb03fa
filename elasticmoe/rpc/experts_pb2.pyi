from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class RunExpertsRequest(_message.Message):
    __slots__ = ("layer", "hidden", "topk_ids", "topk_weights", "placement_version", "step", "duplicate")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    topk_ids: Tensor
    topk_weights: Tensor
    placement_version: int
    step: int
    duplicate: bool
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., topk_ids: _Optional[_Union[Tensor, _Mapping]] = ..., topk_weights: _Optional[_Union[Tensor, _Mapping]] = ..., placement_version: _Optional[int] = ..., step: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class RunExpertsResponse(_message.Message):
    __slots__ = ("output", "compute_us", "missing", "placement_version")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    compute_us: int
    missing: _containers.RepeatedScalarFieldContainer[int]
    placement_version: int
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., compute_us: _Optional[int] = ..., missing: _Optional[_Iterable[int]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class ExpertFrame(_message.Message):
    __slots__ = ("frame", "align")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    ALIGN_FIELD_NUMBER: _ClassVar[int]
    frame: bytes
    align: int
    def __init__(self, frame: _Optional[bytes] = ..., align: _Optional[int] = ...) -> None: ...

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts", "placement_version")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    placement_version: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("loaded", "bytes", "bytes_held", "placement_version")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    loaded: int
    bytes: int
    bytes_held: int
    placement_version: int
    def __init__(self, loaded: _Optional[int] = ..., bytes: _Optional[int] = ..., bytes_held: _Optional[int] = ..., placement_version: _Optional[int] = ...) -> None: ...

class DropExpertsRequest(_message.Message):
    __slots__ = ("experts", "placement_version")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    placement_version: int
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., placement_version: _Optional[int] = ...) -> None: ...

class DropExpertsResponse(_message.Message):
    __slots__ = ("dropped", "bytes", "bytes_held", "placement_version")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_HELD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    bytes: int
    bytes_held: int
    placement_version: int
    def __init__(self, dropped: _Optional[int] = ..., bytes: _Optional[int] = ..., bytes_held: _Optional[int] = ..., placement_version: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertTokens(_message.Message):
    __slots__ = ("layer", "expert", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("shard_id", "uptime_s", "weight_bytes", "held", "tokens", "calls", "compute_us", "placement_version", "busy_us", "duplicates")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUSY_US_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    uptime_s: float
    weight_bytes: int
    held: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    tokens: _containers.RepeatedCompositeFieldContainer[ExpertTokens]
    calls: int
    compute_us: int
    placement_version: int
    busy_us: int
    duplicates: _containers.RepeatedCompositeFieldContainer[ExpertTokens]
    def __init__(self, shard_id: _Optional[str] = ..., uptime_s: _Optional[float] = ..., weight_bytes: _Optional[int] = ..., held: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[ExpertTokens, _Mapping]]] = ..., calls: _Optional[int] = ..., compute_us: _Optional[int] = ..., placement_version: _Optional[int] = ..., busy_us: _Optional[int] = ..., duplicates: _Optional[_Iterable[_Union[ExpertTokens, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ok", "shard_id", "placement_version", "frame_port", "max_message_bytes", "frame_unix_path")
    OK_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FRAME_PORT_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FRAME_UNIX_PATH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    shard_id: str
    placement_version: int
    frame_port: int
    max_message_bytes: int
    frame_unix_path: str
    def __init__(self, ok: _Optional[bool] = ..., shard_id: _Optional[str] = ..., placement_version: _Optional[int] = ..., frame_port: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., frame_unix_path: _Optional[str] = ...) -> None: ...
