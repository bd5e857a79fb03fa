"""A shard's failures as status codes: out of memory (RESOURCE_EXHAUSTED, naming what did not fit), a bad request,
a checkpoint it cannot read."""

from __future__ import annotations

import re

import grpc

from elasticmoe.model.checkpoint import CheckpointError
from elasticmoe.model.experts import LoadStopped
from elasticmoe.model.family_config import ModelSpecError
from elasticmoe.model.oom import CPU_OOM, out_of_memory
from elasticmoe.rpc import frames

__all__ = ["CPU_OOM", "out_of_memory", "placement_code", "run_out_of_memory", "stream_failure"]

_ASKED = re.compile(r"(?:tried to allocate|cannot allocate) (\d+ bytes|[\d.]+ [KMGTP]iB)", re.IGNORECASE)
_REASON_CHARS = 300  # of torch's message, kept in the answer (a GPU's runs to 600 characters of allocator advice)


def _reason(e: BaseException) -> str:
    """torch's (or Python's) reason for `e`: its first line, from CPU_OOM on where it says that, clipped."""
    text = str(e)
    reason = (text[text.index(CPU_OOM):] if CPU_OOM in text else text).splitlines()[0] if text else type(e).__name__
    return reason[:_REASON_CHARS] + "..." if len(reason) > _REASON_CHARS else reason


def run_out_of_memory(layer: int, tokens: int, e: BaseException) -> str:
    """RunExperts' RESOURCE_EXHAUSTED message for `e` (out_of_memory): frames.OUT_OF_MEMORY, the layer, the tokens
    and, where torch says it, the size it could not allocate; then torch's reason (its first line, clipped)."""
    asked = _ASKED.search(str(e))
    size = f", {asked.group(1)} could not be allocated" if asked else ""
    return f"{frames.OUT_OF_MEMORY}: layer {layer}, {tokens} tokens{size} ({_reason(e)})"


def stream_failure(e: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status that ends a RunExpertsStream whose reading thread died of `e` (not its client leaving): its frames
    not yet answered fail at once (the gateway fails them over) instead of at their deadlines. Out of memory (an
    answer that could not be joined, say) is RESOURCE_EXHAUSTED frames.OUT_OF_MEMORY: the shard is alive, not
    reported; anything else is a bug, INTERNAL."""
    if out_of_memory(e):
        return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{frames.OUT_OF_MEMORY}: the stream's reader stopped ({_reason(e)}); its frames not answered end here")
    return grpc.StatusCode.INTERNAL, f"the stream's reader failed: {type(e).__name__}: {_reason(e)}"


def placement_code(e: Exception) -> grpc.StatusCode:
    """A failed load's or drop's status: INVALID_ARGUMENT for a request naming what the model lacks (ValueError),
    FAILED_PRECONDITION for a checkpoint this shard cannot read (its file damaged or gone, or a tensor its config.json
    cannot use, as an FP8 one with no FP8 quantization_config: ModelSpecError; not the caller's fault),
    RESOURCE_EXHAUSTED when the experts (a load's, or those a drop keeps in a layer it rebuilds) do not fit in memory,
    CANCELLED for a load stopped because its caller left (model.experts.LoadStopped), else INTERNAL."""
    if isinstance(e, LoadStopped):
        return grpc.StatusCode.CANCELLED
    if out_of_memory(e):  # a GPU's, the CPU's (expert_weights.storage), torch's CPU allocator (a load's temporary)
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, (CheckpointError, ModelSpecError, OSError)):  # ModelSpecError before ValueError, its base
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(e, ValueError) else grpc.StatusCode.INTERNAL
