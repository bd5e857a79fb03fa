"""A step's expert calls and the groups of (token, slot) pairs they cover, as failover.Step tracks them."""

from __future__ import annotations

import functools
import time
import weakref
from concurrent import futures as cf

import numpy as np
import torch

from elasticmoe.gateway.routing import RoutingTable


class Call:
    """One RunExperts call to a shard (its id and address): the rows [T_s] of the step it carries and their ids
    [T_s, k] (-1 = not this call); `duplicate`: sent marked so (a hedge, or a re-send of slots a shard counted)."""

    __slots__ = ("shard_id", "address", "rows", "ids", "duplicate", "future", "sent_at", "done_at", "output",
                 "compute_s", "__weakref__")

    def __init__(self, shard_id: str, address: str, rows: torch.Tensor, ids: torch.Tensor, duplicate: bool = False):
        self.shard_id, self.address, self.rows, self.ids, self.duplicate = shard_id, address, rows, ids, duplicate
        self.future: cf.Future | None = None
        self.sent_at = time.perf_counter()  # made just before it is sent (dispatcher.send): its round trip's start
        self.done_at = 0.0
        self.output: torch.Tensor | None = None  # [T_s, H] (float64 partial sums) once answered
        self.compute_s = 0.0

    def watch(self, future: cf.Future) -> None:
        """Take the transport's `future` as this call's; its done callback stamps done_at where the answer lands (the
        round trip's end). The callback holds the call weakly: a Future keeps its callbacks once done, and a bound
        method would make call -> future -> callback -> call a cycle, freed by a full collection only (thousands of
        calls a second kept that long)."""
        self.future = future
        future.add_done_callback(functools.partial(_answered, weakref.ref(self)))


def _answered(ref: "weakref.ref[Call]", _future: cf.Future) -> None:
    call = ref()
    if call is not None:
        call.done_at = time.perf_counter()


class Group:
    """A set of (token, slot) pairs, ids [T, k] with -1 elsewhere, and the attempts that each cover all of it."""

    def __init__(self, ids: torch.Tensor, calls: list[Call] | None):
        self.ids = ids
        self.attempts: list[list[Call]] = [calls] if calls else []
        self.broken: set[int] = set()  # indices of failed attempts
        self.winner: list[Call] | None = None
        self.tried: set[str] = set()  # shards that failed: not asked again this step
        self.lacks: dict[str, set[int]] = {}  # shard -> experts it answered `missing`: not asked again for those
        self.busy: dict[str, float] = {}  # full shard -> perf_counter time before which it is not asked again
        self.started = time.perf_counter()
        self.hedged = False
        # a shard counted these slots as routed demand (its call, not a duplicate, answered but could not be used:
        # malformed; or ran past its deadline, which a live shard computes late): every call for them from now on is
        # sent as a duplicate, so they count once
        self.counted = False
        # (controller epoch, table version) of the table in which a hedge found no other copy: versions count within
        # one controller instance, so a restarted controller's table is another one even at the same number
        self.hedge_tried: tuple[str, int] | None = None

    def live(self) -> list[list[Call]]:
        """The attempts not failed (read only: the group's own list where none failed, the engine's every check)."""
        if not self.broken:
            return self.attempts
        return [a for i, a in enumerate(self.attempts) if i not in self.broken]


def by_shard(shard_of: torch.Tensor, ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(shard, rows [T_s] ascending, ids [T, k] kept where routed to it, -1 elsewhere, and those ids' rows [T_s, k])
    per shard in shard_of [T, k] (-1: none), in shard order: all shards at once, in numpy (CPU tensors' views: at a
    decode step's sizes, a dozen numpy calls cost a third of the same torch calls, each torch call's dispatch being
    microseconds of Python)."""
    at, wanted = shard_of.numpy(), ids.numpy()  # [T, k] each
    shards = np.unique(at)  # [U] ascending: -1 first where some slot goes nowhere
    if shards.size and shards[0] < 0:
        shards = shards[1:]
    if not shards.size:
        return []
    mine = at == shards[:, None, None]  # [U, T, k]
    present = mine.any(2)  # [U, T]
    rows = present.nonzero()[1]  # every shard's rows, shard by shard, each ascending
    covered = np.where(mine, wanted, -1)  # [U, T, k]
    out, start = [], 0
    for u, (shard, end) in enumerate(zip(shards.tolist(), present.sum(1).cumsum().tolist())):
        mine_rows = rows[start:end]
        out.append((shard, torch.from_numpy(mine_rows), torch.from_numpy(covered[u]),
                    torch.from_numpy(covered[u][mine_rows])))
        start = end
    return out


def only_rows(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """ids [T, k] kept on `rows` [R] only, -1 elsewhere."""
    out = torch.full_like(ids, -1)
    out[rows] = ids[rows]
    return out


def by_lacks(g: Group) -> list[tuple[torch.Tensor, set[str]]]:
    """g.ids [T, k] split by the shards that answered `missing` for their experts: (ids, those shards) per part."""
    if not g.lacks:
        return [(g.ids, set())]
    parts: dict[frozenset[str], list[int]] = {}
    for e in g.ids.unique().tolist():
        if e >= 0:
            parts.setdefault(frozenset(s for s, lacked in g.lacks.items() if e in lacked), []).append(e)
    return [(torch.where(torch.isin(g.ids, torch.tensor(es, dtype=g.ids.dtype)), g.ids, -1), set(lacking))
            for lacking, es in parts.items()]


def short_only(table: RoutingTable, layer: int, ids: torch.Tensor, hard: set[str], short: set[str]) -> bool:
    """Whether some of ids [T, k] have copies on `short` shards (out of memory for them) and on none outside `hard`
    (the shards not asked again this step; `short` among them). A busy shard's copy, not in `hard`, is another."""
    other = table.assign(layer, ids, table.index_of(hard)) >= 0  # [T, k]
    return bool(((table.assign(layer, ids, table.index_of(hard - short)) >= 0) & ~other).any())
