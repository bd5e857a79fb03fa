"""Memory that ran out, whichever allocator refused: one predicate for the expert store and the shard's answers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

CPU_OOM = "DefaultCPUAllocator: can't allocate memory"  # torch's CPU allocator failing (a RuntimeError, not typed)


def out_of_memory(e: BaseException) -> bool:
    """Memory ran out: a GPU's (torch.OutOfMemoryError), the CPU's (torch's allocator: a RuntimeError saying
    CPU_OOM; model.expert_weights.storage and Python: MemoryError)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and CPU_OOM in str(e))


@contextmanager
def out_of_memory_says(what: str) -> Iterator[None]:
    """Memory running out inside (out_of_memory) raised again as its type, saying `what` first (torch's or Python's
    reason after it, so the predicate still reads it); any other error as it is."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised as is unless out of memory
        if not out_of_memory(e):
            raise
        raise type(e)(f"{what}: {e}") from None
