"""Plan expert copies over shards to balance expected tokens, moving few weights when a placement exists."""

from __future__ import annotations

import heapq
import math

import numpy as np

from .fit import adapt, redundancy
from .flow import shares as _shares
from .placement import Placement
from .search import Move, best_move, key

MAX_CHUNK = 16  # longest run of moves tried on one layer to reach min_gain
_TINY = 1e-9


def plan(
    load: np.ndarray,
    num_shards: int,
    slots_per_shard: int,
    current: Placement | None = None,
    max_moves: int | None = None,
    min_gain: float = 0.02,
    min_copies: int = 1,
) -> Placement:
    """Place each layer's experts on `num_shards` shards of `slots_per_shard` slots for max balancedness.

    load: [L, E] expected tokens per expert (>= 0). Shares are always the exact lexicographic min-max split.
    Without `current` every slot is used: copies per expert by load-per-copy, LPT packing, then local search
    (max_moves and min_gain are ignored). With `current` its copies are kept and its shares re-optimised,
    then moves (creating a copy; dropping one is free and only done to free a slot) go in runs that each lift
    one layer's balancedness by >= min_gain, the largest drop of a layer's max shard load per move first,
    at most max_moves in all (None: unbounded). Scale-in drops shards >= num_shards (to retire another one,
    pass current.relabel(...)); experts left without a copy are re-placed by forced moves, which count
    against max_moves and are made even past it. Scale-out adds empty shards. Version: current.version + 1.
    Every expert ends with at least min(min_copies, num_shards) copies whenever num_shards * slots_per_shard
    allows (redundancy for failover: after a shard loss re-homes onto fewer shards, a later scale-out restores
    the copies); on full shards surplus copies of other experts give way, a drop in the plan.
    """
    w = _check(load, num_shards, slots_per_shard, current, max_moves, min_gain)
    if not _is_int(min_copies) or min_copies < 1:
        raise ValueError(f"min_copies must be an int >= 1, got {min_copies!r}")
    k = min(min_copies, num_shards)
    if current is None:
        masks = [_from_scratch(row, num_shards, slots_per_shard, k) for row in w]
        return _build(w, [redundancy(row, m, k, slots_per_shard)[0] for row, m in zip(w, masks)], slots_per_shard, 0)
    holds, weights = current.holds(), current.shares()
    fitted = [adapt(row, holds[l], weights[l], num_shards, slots_per_shard) for l, row in enumerate(w)]
    fitted = [(m2, n + n2) for row, (m, n) in zip(w, fitted) for m2, n2 in [redundancy(row, m, k, slots_per_shard)]]
    forced = sum(n for _, n in fitted)
    budget = None if max_moves is None else max(0, max_moves - forced)
    masks = _spend(w, [m for m, _ in fitted], slots_per_shard, budget, min_gain, k)  # never evicts below k
    return _build(w, masks, slots_per_shard, current.version + 1)


def greedy_from_scratch(load: np.ndarray, num_shards: int, slots_per_shard: int) -> Placement:
    """Baseline: extra copies to the highest load-per-copy expert until slots run out, LPT packing, equal shares."""
    w = _check(load, num_shards, slots_per_shard, None, None, 0.0)
    counts = [_copy_counts(row, num_shards, slots_per_shard) for row in w]
    holds = np.stack([_pack(row, c, num_shards, slots_per_shard) for row, c in zip(w, counts)])
    return Placement.from_arrays(holds / holds.sum(2, keepdims=True), holds, slots_per_shard)


def _check(load, num_shards, slots_per_shard, current, max_moves, min_gain) -> np.ndarray:
    """Validate arguments (ValueError names the bad one); returns load as float [L, E]."""
    try:
        w = np.asarray(load, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"load must be a numeric [layers, experts] array: {exc}") from exc
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"load must be a non-empty [layers, experts] array, got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("load must be finite and >= 0")
    for name, value in (("num_shards", num_shards), ("slots_per_shard", slots_per_shard)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_shards * slots_per_shard < w.shape[1]:
        raise ValueError(
            f"num_shards * slots_per_shard = {num_shards * slots_per_shard} slots < {w.shape[1]} experts in load"
        )
    if max_moves is not None and (not _is_int(max_moves) or max_moves < 0):
        raise ValueError(f"max_moves must be None or an int >= 0, got {max_moves!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < math.inf:
        raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain!r}")
    if current is not None:
        if not isinstance(current, Placement):
            raise ValueError(f"current must be a Placement, got {type(current).__name__}")
        if (current.num_layers, current.num_experts) != w.shape:
            got = (current.num_layers, current.num_experts)
            raise ValueError(f"current places {got} (layers, experts) but load has shape {w.shape}")
    return w


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _from_scratch(w: np.ndarray, n: int, slots: int, k: int = 1) -> np.ndarray:
    """Copies by load-per-copy, LPT packing, then local search to a local optimum. w: [E]; returns [E, n]."""
    return _improve(w, _pack(w, _copy_counts(w, n, slots, k), n, slots), slots, k)


def _copy_counts(w: np.ndarray, n: int, slots: int, k: int = 1) -> np.ndarray:
    """Copies per expert filling all n * slots slots (<= n each), k each first where they fit, then each extra
    copy to the max load-per-copy. w: [E]."""
    counts = np.full(len(w), k if n * slots >= k * len(w) else 1, np.int64)
    heap = [(-float(x) / c, e) for (x, c, e) in zip(w, counts, range(len(w))) if c < n]
    heapq.heapify(heap)
    for _ in range(min(n * slots, n * len(w)) - int(counts.sum())):
        while counts[heap[0][1]] >= n:
            heapq.heappop(heap)
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-float(w[e]) / counts[e], e))
    return counts


def _pack(w: np.ndarray, counts: np.ndarray, n: int, slots: int) -> np.ndarray:
    """LPT: copies by load-per-copy, heaviest first, onto the least-loaded shard with room and no copy yet.

    w: [E] tokens, counts: [E] copies (<= n each, sum <= n * slots). Returns holds [E, n] bool.
    """
    per = w / counts
    order = np.argsort(-per, kind="stable")
    mask = np.zeros((len(w), n), bool)
    load, used = np.zeros(n), np.zeros(n, np.int64)
    for e in np.repeat(order, counts[order]):
        ok = np.flatnonzero((used < slots) & ~mask[e])
        s = ok[np.lexsort((ok, used[ok], load[ok]))[0]] if len(ok) else _make_room(mask, used, load, per, slots, e)
        mask[e, s] = True
        used[s] += 1
        load[s] += per[e]
    return mask


def _make_room(mask, used, load, per, slots, e) -> int:
    """Only shards already holding e have room: shift some f from a full shard u to such a shard; returns u."""
    t = int(np.flatnonzero(used < slots)[0])
    u = int(np.flatnonzero(~mask[e])[0])
    f = int(np.flatnonzero(mask[:, u] & ~mask[:, t])[0])
    mask[f, u], mask[f, t] = False, True
    used[u] -= 1
    used[t] += 1
    load[u] -= per[f]
    load[t] += per[f]
    return u


def _improve(w: np.ndarray, mask: np.ndarray, slots: int, k: int = 1) -> np.ndarray:
    """Apply the best cost-lowering move until none is left. w: [E], mask: [E, N] (updated in place)."""
    cur = key(w, mask)
    for _ in range(4 * mask.size):
        move = best_move(w, mask, slots, cur, k)
        if move is None:
            break
        _apply(mask, move)
        cur = key(w, mask)
    return mask


def _apply(mask: np.ndarray, move: Move) -> None:
    if move.evict >= 0:
        mask[move.evict, move.shard] = False
    mask[move.expert, move.shard] = True


def _balancedness(w: np.ndarray, level: float, n: int) -> float:
    return float(w.sum()) / n / level if level > 0 else 1.0


def _chunk(w: np.ndarray, mask: np.ndarray, slots: int, limit: int, min_gain: float, k: int = 1):
    """Fewest best-first moves lifting this layer's balancedness by >= min_gain (and > 0).

    w: [E], mask: [E, N]. Returns (moves, drop of the max shard load, new holds [E, N]) or None if
    `limit` moves do not get there.
    """
    n = mask.shape[1]
    cur = key(w, mask)
    start, top = _balancedness(w, cur.level, n), cur.level
    if 1.0 - start < max(min_gain, _TINY):
        return None
    trial = mask.copy()
    for used in range(1, limit + 1):
        move = best_move(w, trial, slots, cur, k)
        if move is None:
            return None
        _apply(trial, move)
        cur = key(w, trial)
        gain = _balancedness(w, cur.level, n) - start
        if gain >= min_gain and gain > _TINY:
            return used, top - cur.level, trial
    return None


def _spend(w: np.ndarray, masks: list[np.ndarray], slots: int, budget: int | None, min_gain: float,
           k: int = 1) -> list:
    """Give moves to layers in runs (see _chunk), largest drop of max shard load (~ layer time) per move first.

    w: [L, E], masks: L x [E, N] holds. Returns the new holds.
    """
    left = math.inf if budget is None else budget
    chunks = {l: _chunk(w[l], m, slots, int(min(left, MAX_CHUNK)), min_gain, k) if left else None
              for l, m in enumerate(masks)}
    while left > 0:
        live = {l: c for l, c in chunks.items() if c is not None and c[0] <= left}
        if not live:
            break
        l = max(live, key=lambda l: (live[l][1] / live[l][0], -l))
        used, _, masks[l] = live[l]
        left -= used
        chunks[l] = _chunk(w[l], masks[l], slots, int(min(left, MAX_CHUNK)), min_gain, k) if left else None
    return masks


def _build(w: np.ndarray, masks: list[np.ndarray], slots: int, version: int) -> Placement:
    """Placement with min-max shares for each layer's holds. w: [L, E], masks: L x [E, N]."""
    holds = np.stack(masks)
    return Placement.from_arrays(np.stack([_shares(row, m) for row, m in zip(w, masks)]), holds, slots, version)
