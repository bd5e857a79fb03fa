"""The seam between the dense half and the expert half: route -> dispatch -> experts -> combine."""

from __future__ import annotations

from typing import Protocol

import torch

from elasticmoe.model.experts import ExpertStore


class ExpertsUnavailable(RuntimeError):
    """No live copy could run some routed experts this step (all shards holding them failed or timed out).

    Transient: the engine retries the step (KV writes are keyed by position) and ends only the requests that
    still cannot be served, with UNAVAILABLE on gRPC and 503 on HTTP. `public`: the cause as a client may read it
    (no address, no shard id); None: the client is told only that experts are unavailable. `for_its_size`: the
    step failed for the tokens it carries (a shard out of memory for them): repeated unchanged it fails again, so
    the engine runs it in smaller parts at once instead of retrying it. `deterministic`: the step fails the same
    way however often it is repeated, whatever its size (a message limit below one token's row): the engine does
    not retry it but runs its requests one by one at once.
    """

    public: str | None = None
    for_its_size: bool = False
    deterministic: bool = False


class Pending(Protocol):
    """An expert computation in flight; `wait()` returns the combined output [T, H]."""

    def wait(self) -> torch.Tensor: ...


class Dispatcher(Protocol):
    """Runs a layer's routed experts for the step's tokens, wherever the experts live.

    `dispatch` must return quickly when the work is remote, so the caller can overlap its own work
    (shared experts) before `wait()`.
    """

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> Pending: ...


class _Done:
    __slots__ = ("out",)

    def __init__(self, out: torch.Tensor):
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class LocalDispatcher:
    """All experts in this process: one ExpertStore, computed at dispatch time."""

    def __init__(self, store: ExpertStore):
        self.store = store

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> Pending:
        """hidden [T, H], topk_ids [T, k] global ids, topk_weights [T, k] -> Pending of [T, H] in hidden's dtype."""
        return _Done(self.store.forward(layer, hidden, topk_ids, topk_weights).to(hidden.dtype))
