"""A RunExperts request or frame checked before it runs: each bad field refused INVALID_ARGUMENT, named."""

from __future__ import annotations

import grpc
import numpy as np
import torch

from elasticmoe.model.spec import ModelSpec
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.frame_types import as_tensor

_ID_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def decode_run(request: pb.RunExpertsRequest, context, spec: ModelSpec, max_rows: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H] in `dtype`, topk_ids [T, k], topk_weights [T, k]) on `device`, once the request is valid: layer,
    dtypes, shapes, k <= top-k, ids in range, T <= max_rows; else context.abort(INVALID_ARGUMENT, ...)."""
    def bad(message: str):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    if not (0 <= request.layer < spec.num_layers and spec.moe.sparse_layers[request.layer]):
        bad(f"layer: {request.layer} is not an MoE layer of this model")
    for name, msg, ndim in (("hidden", request.hidden, 2), ("topk_ids", request.topk_ids, 2),
                            ("topk_weights", request.topk_weights, 2)):
        if len(msg.shape) != ndim:
            bad(f"{name}: shape {list(msg.shape)} must have {ndim} dimensions")
    t, k = request.topk_ids.shape
    if not 1 <= k <= spec.moe.top_k:
        bad(f"topk_ids: k = {k}, must be in [1, {spec.moe.top_k}] (the model's top-k)")
    if t > max_rows:
        bad(f"hidden: {t} rows, more than the batched-token limit {max_rows}")
    try:
        hidden, ids, weights = (as_tensor(request.hidden, "hidden"), as_tensor(request.topk_ids, "topk_ids"),
                                as_tensor(request.topk_weights, "topk_weights"))
    except ValueError as e:
        bad(str(e))
    if hidden.dtype not in _FLOAT_DTYPES or weights.dtype not in _FLOAT_DTYPES or ids.dtype not in _ID_DTYPES:
        bad(f"dtypes: hidden {_name(hidden)} and topk_weights {_name(weights)} must be float32, float16 or bfloat16, "
            f"topk_ids {_name(ids)} int32 or int64")
    if hidden.shape[1] != spec.hidden_size or hidden.shape[0] != t or weights.shape != ids.shape:
        bad(f"shapes: hidden {list(hidden.shape)}, topk_ids {list(ids.shape)}, topk_weights "
            f"{list(weights.shape)}; want [T, {spec.hidden_size}], [T, k], [T, k]")
    if ids.numel():  # numpy: each reduction ~1 us on a call's few ids, where torch's take 3-10 (run per layer and step)
        id_array = ids.numpy()  # [T, k]
        if int(id_array.max()) >= spec.moe.num_experts or int(id_array.min()) < -1:
            bad(f"topk_ids: ids must be in [-1, {spec.moe.num_experts})")
        if not _finite_where_routed(weights, id_array):
            bad("topk_weights: must be finite where topk_ids >= 0")
    return _on(hidden, device, dtype), _on(ids, device), _on(weights, device)


def _finite_where_routed(weights: torch.Tensor, ids: np.ndarray) -> bool:
    """Whether weights [T, k] are finite wherever ids [T, k] >= 0 (a -1 slot's weight is ignored)."""
    w = (weights if weights.dtype != torch.bfloat16 else weights.float()).numpy()  # numpy has no bfloat16
    return bool(np.isfinite(w).all()) or bool(np.isfinite(w[ids >= 0]).all())  # all finite: the usual answer


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on `device` (in `dtype`), itself where it is already there (Tensor.to costs ~1 us even then)."""
    if t.device == device and (dtype is None or t.dtype == dtype):
        return t
    return t.to(device) if dtype is None else t.to(device, dtype)
