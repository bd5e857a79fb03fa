"""The gateway's routing table: which shard copy serves every (token, slot) of a layer, around failed shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

_GOLDEN = 0.6180339887498949  # spreads token rows evenly over [0, 1) for splitting a replicated expert
_STEP = 0.4142135623730950  # sqrt(2) - 1: moves the points from step to step, independent of _GOLDEN's rows
_TOP = 1.0 + 1e-6  # cumulative share of a layer's last live copy: above every u in [0, 1)


@dataclass(frozen=True)
class RoutingTable:
    """Where every expert of every MoE layer lives, and what share of its tokens each copy takes."""

    version: int
    shards: tuple[str, ...]  # shard index -> shard id
    addresses: tuple[str, ...]  # shard index -> "host:port"
    copies: dict[int, torch.Tensor]  # layer -> [E, C] shard index per copy (-1 = none)
    shares: dict[int, torch.Tensor]  # layer -> [E, C] share of the expert's tokens per copy (0 where none)
    epoch: str = ""  # the controller instance that made it: versions count within one instance
    _plans: dict = field(default_factory=dict, compare=False, repr=False)  # (layer, exclude) -> _plan's answer

    @staticmethod
    def from_dict(d: dict) -> "RoutingTable":
        """From the controller's table: {version, epoch, shards: [{id, address}],
        layers: {layer: [[(shard_idx, share)...] per expert]}}."""
        copies, shares = {}, {}
        for layer, experts in d["layers"].items():
            width = max(1, max((len(c) for c in experts), default=1))
            idx = torch.full((len(experts), width), -1, dtype=torch.int64)
            share = torch.zeros((len(experts), width), dtype=torch.float64)
            for e, reps in enumerate(experts):
                for j, (s, x) in enumerate(reps):
                    idx[e, j], share[e, j] = int(s), max(0.0, float(x))
            copies[int(layer)], shares[int(layer)] = idx, share
        return RoutingTable(int(d["version"]), tuple(s["id"] for s in d["shards"]),
                            tuple(s["address"] for s in d["shards"]), copies, shares, str(d.get("epoch", "")))

    def index_of(self, shard_ids) -> frozenset[int]:
        """Shard indices of this table for a set of shard ids (ids not in the table are ignored)."""
        ids = set(shard_ids)
        if not ids:  # every step's path: nothing to exclude
            return frozenset()
        return frozenset(i for i, s in enumerate(self.shards) if s in ids)

    def cumulative(self, layer: int, exclude: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """(copies [E, C] with excluded and empty copies set to -1, cum [E, C] float64).

        cum[e, j] is the upper end of copy j's interval in [0, 1): the live copies' shares renormalised to sum to
        1 (equal shares when the live ones all carry 0), an empty interval for a dead copy, and _TOP from the last
        live copy on, so u in [0, 1) picks copy (cum <= u).sum(). An expert with no live copy has no interval.
        """
        copies = self.copies[layer]
        alive = copies >= 0
        if exclude:
            alive &= ~torch.isin(copies, torch.tensor(sorted(exclude), dtype=torch.int64))
        share = self.shares[layer] * alive
        total = share.sum(1, keepdim=True)
        even = alive.to(torch.float64)
        share = torch.where(total > 0, share, even)  # live copies that all carry share 0: split evenly
        total = share.sum(1, keepdim=True)
        cum = share.cumsum(1) / total.clamp_min(1e-300)
        last = alive.to(torch.int64).cumsum(1) == alive.sum(1, keepdim=True)  # at or after the last live copy
        cum = torch.where(last & (total > 0), torch.full_like(cum, _TOP), cum)
        return torch.where(alive, copies, -1), cum

    def assign(self, layer: int, topk_ids: torch.Tensor, exclude: frozenset[int] = frozenset(),
               step: int = 0) -> torch.Tensor:
        """Shard index for every (token, slot) of topk_ids [T, k]: -1 where the id is -1 or no live copy is left.

        Copies of a replicated expert take its tokens in proportion to their shares, deterministic per (row, slot,
        step): `step` (the engine's step count) shifts every row's point, so that a batch of one token still
        spreads over the copies from step to step (the same point each step sent every lone token to one copy).
        """
        sole, copies, cum, _ = self._plan(layer, exclude)
        if sole is not None:  # no expert has two live copies: one lookup (id -1 reads sole's last entry, -1)
            return sole[topk_ids]
        ids = topk_ids.clamp_min(0)
        u = _spread(*topk_ids.shape)  # [T, k]
        if step:
            u = (u + step * _STEP) % 1.0
        pick = (cum[ids] <= u.unsqueeze(-1)).sum(-1).clamp_max(copies.shape[1] - 1)  # [T, k] copy index
        shard = copies[ids].gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        return torch.where(topk_ids >= 0, shard, -1)

    def covers(self, layer: int, exclude: frozenset[int] = frozenset()) -> bool:
        """Whether every expert of `layer` has a live copy outside `exclude`: assign then gives -1 only for id -1."""
        return self._plan(layer, exclude)[3]

    def _plan(self, layer: int, exclude: frozenset[int]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor,
                                                                   bool]:
        """cumulative(layer, exclude) plus sole [E + 1] (each expert's live copy, -1 for none and for id -1) when no
        expert has two live copies, else None, and covers(); cached per table (it never changes), a few exclusion
        sets at most."""
        plan = self._plans.get((layer, exclude))
        if plan is None:
            copies, cum = self.cumulative(layer, exclude)
            live = copies >= 0  # [E, C]
            sole = None
            if bool((live.sum(1) <= 1).all()):
                sole = torch.cat([copies.max(1).values, torch.tensor([-1], dtype=copies.dtype)])
            plan = (sole, copies, cum, bool(live.any(1).all()))
            if len(self._plans) < 256:
                self._plans[(layer, exclude)] = plan
        return plan


@lru_cache(maxsize=64)
def _spread(t: int, k: int) -> torch.Tensor:
    """u [T, k] in [0, 1): row r, slot j at (r * golden + j / 2) mod 1, spreading rows evenly over a copy's share."""
    rows, slots = torch.arange(t, dtype=torch.float64), torch.arange(k, dtype=torch.float64)
    return (rows.unsqueeze(1) * _GOLDEN + slots * 0.5) % 1.0
