"""Placement: which shards hold a copy of each (layer, expert) and the share of its tokens each copy serves."""

from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any, Sequence

import numpy as np

Replica = tuple[int, float]  # (shard, share of the expert's tokens)
_SHARE_TOL = 1e-6


@dataclass(frozen=True)
class Placement:
    """Expert copies per layer. layout[layer][expert] = ((shard, share), ...) sorted by shard.

    Every layer is placed independently: a shard holds at most `slots_per_shard` copies of each layer.
    """

    num_shards: int
    slots_per_shard: int
    layout: tuple[tuple[tuple[Replica, ...], ...], ...]
    version: int = 0

    # ----- construction
    @classmethod
    def from_arrays(cls, shares: np.ndarray, holds: np.ndarray, slots_per_shard: int, version: int = 0) -> Placement:
        """Build from shares [L, E, N] float and holds [L, E, N] bool (a held copy may carry share 0)."""
        layout = tuple(
            tuple(tuple((int(s), float(shares[l, e, s])) for s in np.flatnonzero(row)) for e, row in enumerate(layer))
            for l, layer in enumerate(holds)
        )
        return cls(int(holds.shape[2]), int(slots_per_shard), layout, int(version))

    @classmethod
    def even(cls, num_layers: int, num_experts: int, num_shards: int, slots_per_shard: int,
             copies: int = 1) -> Placement:
        """Initial contiguous split: expert e on shards (e * num_shards // num_experts + j) % num_shards for
        j < copies, equal shares. copies > 1 survives the loss of copies - 1 shards with no weight move."""
        if num_layers < 1 or num_experts < 1 or num_shards < 1 or slots_per_shard < 1 or copies < 1:
            raise ValueError("num_layers, num_experts, num_shards, slots_per_shard and copies must all be >= 1")
        if copies > num_shards:
            raise ValueError(f"copies = {copies} > num_shards = {num_shards}")
        if num_shards * slots_per_shard < num_experts * copies:
            raise ValueError(f"num_shards * slots_per_shard = {num_shards * slots_per_shard} < num_experts * "
                             f"copies = {num_experts * copies}")
        row = tuple(tuple(sorted(((e * num_shards // num_experts + j) % num_shards, 1.0 / copies)
                                 for j in range(copies))) for e in range(num_experts))
        return cls(num_shards, slots_per_shard, (row,) * num_layers)

    # ----- queries
    @property
    def num_layers(self) -> int:
        return len(self.layout)

    @property
    def num_experts(self) -> int:
        return len(self.layout[0]) if self.layout else 0

    def replicas(self, layer: int, expert: int) -> list[Replica]:
        """[(shard, share), ...] of one expert; shares sum to 1."""
        return list(self.layout[layer][expert])

    def copies(self, layer: int, expert: int) -> int:
        return len(self.layout[layer][expert])

    def num_copies(self) -> np.ndarray:
        """[L, E] int copies per expert."""
        return np.array([[len(r) for r in row] for row in self.layout], dtype=np.int64).reshape(self.num_layers, -1)

    def experts_on(self, shard: int) -> list[tuple[int, int]]:
        """[(layer, expert), ...] with a copy on `shard`, in layer then expert order."""
        return [
            (l, e) for l, row in enumerate(self.layout) for e, reps in enumerate(row) if shard in (s for s, _ in reps)
        ]

    def holds(self) -> np.ndarray:
        """[L, E, N] bool: which shards hold a copy."""
        out = np.zeros((self.num_layers, self.num_experts, self.num_shards), bool)
        for l, row in enumerate(self.layout):
            for e, reps in enumerate(row):
                out[l, e, [s for s, _ in reps]] = True
        return out

    def shares(self) -> np.ndarray:
        """[L, E, N] float: share of each expert's tokens served per shard (0 where no copy)."""
        out = np.zeros((self.num_layers, self.num_experts, self.num_shards))
        for l, row in enumerate(self.layout):
            for e, reps in enumerate(row):
                for s, share in reps:
                    out[l, e, s] = share
        return out

    def shard_load(self, load: np.ndarray) -> np.ndarray:
        """Expected tokens per shard: load [L, E] -> [L, N]."""
        load = np.asarray(load, dtype=float)
        if load.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"load has shape {load.shape}, expected {(self.num_layers, self.num_experts)}")
        return np.einsum("le,len->ln", load, self.shares())

    def balancedness(self, load: np.ndarray) -> np.ndarray:
        """[L] mean over shards / max over shards of the shard load (1.0 = perfect; 1.0 for an idle layer)."""
        per = self.shard_load(load)
        top = per.max(1)
        return np.where(top > 0, per.mean(1) / np.where(top > 0, top, 1.0), 1.0)

    def diff(self, other: Placement) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
        """Copies to create and to drop to turn this placement into `other`.

        Returns (added, removed), sorted lists of (layer, expert, shard); len(added) is the number of moves.
        """
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError("other has a different number of layers or experts")
        mine, theirs = self._copy_set(), other._copy_set()
        return sorted(theirs - mine), sorted(mine - theirs)

    def _copy_set(self) -> set[tuple[int, int, int]]:
        return {(l, e, s) for l, row in enumerate(self.layout) for e, reps in enumerate(row) for s, _ in reps}

    def relabel(self, order: Sequence[int]) -> Placement:
        """Renumber shards: new shard i is old shard order[i] (a permutation of range(num_shards)).

        To retire shard k, plan with num_shards - 1 and current=p.relabel([...all but k..., k]).
        """
        if sorted(order) != list(range(self.num_shards)):
            raise ValueError(f"order must be a permutation of range({self.num_shards})")
        new = {old: i for i, old in enumerate(order)}
        layout = tuple(
            tuple(tuple(sorted((new[s], share) for s, share in reps)) for reps in row) for row in self.layout
        )
        return replace(self, layout=layout)

    # ----- checks and transport
    def validate(self) -> None:
        """Raise ValueError unless every expert has >= 1 copy, shards are in range and not repeated per expert,
        shares are >= 0 and sum to 1, and no shard holds more than slots_per_shard copies of a layer."""
        if self.num_shards < 1 or self.slots_per_shard < 1:
            raise ValueError("num_shards and slots_per_shard must be >= 1")
        if not self.layout or not all(self.layout):
            raise ValueError("layout must have >= 1 layer and >= 1 expert per layer")
        if len({len(row) for row in self.layout}) > 1:
            raise ValueError("layers have different numbers of experts")
        for l, row in enumerate(self.layout):
            used = np.zeros(self.num_shards, np.int64)
            for e, reps in enumerate(row):
                where = [s for s, _ in reps]
                if not reps:
                    raise ValueError(f"layer {l} expert {e} has no copy")
                if len(set(where)) != len(where) or not all(0 <= s < self.num_shards for s in where):
                    raise ValueError(f"layer {l} expert {e} has repeated or out-of-range shards {where}")
                if any(not share >= 0 for _, share in reps) or abs(sum(x for _, x in reps) - 1) > _SHARE_TOL:
                    raise ValueError(f"layer {l} expert {e} shares {[x for _, x in reps]} are not >= 0 summing to 1")
                used[where] += 1
            if used.max() > self.slots_per_shard:
                s = int(used.argmax())
                raise ValueError(f"layer {l} shard {s} holds {int(used.max())} copies > slots_per_shard")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: {"num_shards", "slots_per_shard", "version", "layout": [[[[shard, share], ...]]]}."""
        return {
            "num_shards": self.num_shards,
            "slots_per_shard": self.slots_per_shard,
            "version": self.version,
            "layout": [[[[s, x] for s, x in reps] for reps in row] for row in self.layout],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Placement:
        """Inverse of to_dict; validates the result. A malformed dict raises ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a placement must be a dict, got {type(data).__name__}")
        fields = {}
        for name, low in (("num_shards", 1), ("slots_per_shard", 1), ("version", 0)):
            value = data.get(name, 0 if name == "version" else None)
            if not _is_int(value) or value < low:
                raise ValueError(f"placement {name} must be an int >= {low}, got {value!r}")
            fields[name] = int(value)
        out = cls(fields["num_shards"], fields["slots_per_shard"], _layout(data.get("layout")), fields["version"])
        out.validate()
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _layout(raw: Any) -> tuple[tuple[tuple[Replica, ...], ...], ...]:
    """The layout of to_dict (layers of experts of [shard, share] pairs), each list non-empty; ValueError naming
    the first bad entry, e.g. layout[0][3][1]."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"placement layout must be a non-empty list of layers, got {raw!r:.80}")
    layers = []
    for l, row in enumerate(raw):
        if not isinstance(row, list) or not row:
            raise ValueError(f"placement layout[{l}] must be a non-empty list of experts, got {row!r:.80}")
        experts = []
        for e, reps in enumerate(row):
            if not isinstance(reps, list):
                raise ValueError(f"placement layout[{l}][{e}] must be a list of [shard, share], got {reps!r:.80}")
            for c, rep in enumerate(reps):
                ok = isinstance(rep, (list, tuple)) and len(rep) == 2 and _is_int(rep[0])
                if not ok or not isinstance(rep[1], Real) or isinstance(rep[1], bool):
                    raise ValueError(f"placement layout[{l}][{e}][{c}] must be [shard (int), share (number)], "
                                     f"got {rep!r:.80}")
            experts.append(tuple((int(s), float(x)) for s, x in reps))
        layers.append(tuple(experts))
    return tuple(layers)
