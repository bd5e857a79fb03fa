"""Device -> host staging for the wire: pinned buffers, non-blocking copies, a wait on the copying stream only."""

from __future__ import annotations

import torch


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies of `tensors` for encoding; CPU tensors pass through untouched.

    CUDA tensors are copied with non_blocking=True, which lands them in page-locked memory from torch's caching
    host allocator (a reused staging pool, no per-call cudaHostAlloc); then one event recorded on each source
    device's current stream is waited for: no device-wide synchronize, other streams keep running.
    """
    if not any(t.is_cuda for t in tensors):
        return list(tensors)
    out = [t.to("cpu", non_blocking=True) if t.is_cuda else t for t in tensors]
    for device in {t.device for t in tensors if t.is_cuda}:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        done.synchronize()
    return out

