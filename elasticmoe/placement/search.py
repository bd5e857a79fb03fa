"""Single-copy moves that best lower a layer's soft-max shard load, scored exactly (subset sums or max-flow)."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from .flow import balance

ZETA_MAX_SHARDS = 10  # up to here every candidate is scored at once over all 2**N shard subsets
PRUNED_CANDIDATES = 24  # beyond it, only this many heuristically best candidates get a max-flow each
POWER = 8  # cost = sum over shards of (load / mean) ** POWER at the optimal shares: a soft max
_SAME = 1e-9  # relative differences below this are ties
_CELLS = 1 << 20  # candidates x subsets scored per batch (bounds memory)


class Key(NamedTuple):
    """A layer layout's best shard loads: soft-max cost, max load, and the load stages from the top down."""

    cost: float
    level: float
    stages: list[tuple[float, np.ndarray]]  # (level, shards [N] bool) of the lexicographically optimal loads


class Move(NamedTuple):
    """Create a copy of `expert` on `shard`, first dropping `evict`'s copy there (-1: a slot is free)."""

    expert: int
    shard: int
    evict: int
    cost: float


@lru_cache(maxsize=None)
def _subset_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """subsets [2**n], popcounts [2**n], membership bits [2**n, n] (uint8)."""
    subsets = np.arange(1 << n)
    bits = ((subsets[:, None] >> np.arange(n)) & 1).astype(np.uint8)
    return subsets, bits.sum(1).astype(np.int64), bits


def _subset_sums(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """g [2**N]: tokens of the experts whose every copy lies inside each shard subset. w: [E], mask: [E, N]."""
    n = mask.shape[1]
    g = np.bincount(mask @ (1 << np.arange(n)), weights=w, minlength=1 << n)
    for i in range(n):
        view = g.reshape(-1, 2, 1 << i)
        view[:, 1, :] += view[:, 0, :]
    return g


def _stages(g: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peel densest shard sets off subset sums g [K, 2**n] (Fujishige's decomposition of the optimal loads).

    Returns levels [K, n], sizes [K, n] (shards per stage, 0 = none) and prefixes [K, n] (bitmask of the
    union of the stages so far).
    """
    subsets, pop, bits = _subset_tables(n)
    rows = np.arange(len(g))
    done, g_done, n_done = np.zeros(len(g), np.int64), np.zeros(len(g)), np.zeros(len(g), np.int64)
    levels, sizes, prefix = np.zeros((len(g), n)), np.zeros((len(g), n), np.int64), np.zeros((len(g), n), np.int64)
    for k in range(n):
        if (n_done == n).all():
            break
        ext = ((subsets & done[:, None]) == done[:, None]) & (pop > n_done[:, None])
        dens = np.where(ext, (g - g_done[:, None]) / np.maximum(pop - n_done[:, None], 1), -np.inf)
        top = dens.max(1)
        near = ext & (dens >= (top - _SAME * np.abs(top))[:, None])
        union = ((near.astype(np.uint8) @ bits) > 0) @ (1 << np.arange(n))
        live = n_done < n
        union = np.where(live, union, done)
        levels[:, k] = np.where(live, top, 0.0)
        sizes[:, k] = pop[union] - n_done
        prefix[:, k] = union
        done, g_done, n_done = union, g[rows, union], pop[union]
    return levels, sizes, prefix


def _cost(levels: np.ndarray, sizes: np.ndarray, mean: float) -> np.ndarray:
    """Soft-max cost sum(size * (level / mean) ** POWER) per row. levels, sizes: [K, S]."""
    return (sizes * (np.maximum(levels, 0.0) / max(mean, 1e-300)) ** POWER).sum(1)


def _hull_cost(g: np.ndarray, n: int, mean: float) -> tuple[np.ndarray, np.ndarray]:
    """Cost and max load straight from subset sums g [K, 2**n]; returns ([K], [K]).

    The sorted optimal loads are the slopes of the upper concave envelope of h(j) = max g over j-shard
    subsets (g is supermodular), so no peeling is needed.
    """
    subsets, pop, _ = _subset_tables(n)
    order = np.argsort(pop, kind="stable")
    h = np.maximum.reduceat(g[:, order], np.searchsorted(pop[order], np.arange(n + 1)), axis=1)
    rows, x = np.arange(len(g)), np.arange(n + 1)
    pos, cost, level = np.zeros(len(g), np.int64), np.zeros(len(g)), None
    while (pos < n).any():
        ahead = x > pos[:, None]
        slope = np.where(ahead, (h - h[rows, pos][:, None]) / np.where(ahead, x - pos[:, None], 1), -np.inf)
        top = slope.max(1)
        level = top if level is None else level
        nxt = np.where(ahead & (slope >= (top - _SAME * np.abs(top))[:, None]), x, -1).max(1)
        live = pos < n
        cost += np.where(live, (nxt - pos) * (np.maximum(top, 0.0) / max(mean, 1e-300)) ** POWER, 0.0)
        pos = np.where(live, nxt, pos)
    return cost, level


def key(w: np.ndarray, mask: np.ndarray) -> Key:
    """Cost, max load and load stages of a layout at its optimal shares. w: [E] tokens, mask: [E, N] bool."""
    n = mask.shape[1]
    mean = float(w.sum()) / n
    if n > ZETA_MAX_SHARDS:
        stages = balance(w, mask)[1]
        levels = np.array([[x for x, _ in stages]])
        return Key(float(_cost(levels, np.array([[s.sum() for _, s in stages]]), mean)[0]), stages[0][0], stages)
    g = _subset_sums(w, mask)[None]
    levels, sizes, prefix = _stages(g, n)
    stages, before = [], 0
    for x, size, union in zip(levels[0], sizes[0], prefix[0]):
        if size:
            stages.append((float(x), (((union & ~before) >> np.arange(n)) & 1).astype(bool)))
            before = union
    return Key(float(_hull_cost(g, n, mean)[0][0]), float(levels[0, 0]), stages)


def candidates(w: np.ndarray, mask: np.ndarray, slots: int, cur: Key, floor: int = 1) -> np.ndarray:
    """Moves that can relieve an above-mean stage: an expert living only in it (or above) gets a copy below.

    Returns [K, 3] int rows (expert, shard, evict); evict = -1 where the shard has a free slot. Only copies of
    experts holding more than `floor` copies are evicted.
    """
    counts, used = mask.sum(1), mask.sum(0)
    mean = float(w.sum()) / mask.shape[1]
    prefix, rows = np.zeros(mask.shape[1], bool), []
    for level, shards in cur.stages:
        if level <= mean * (1 + _SAME):
            break
        was_inside = ~(mask & ~prefix).any(1)
        prefix = prefix | shards
        inside = np.flatnonzero((w > 0) & ~(mask & ~prefix).any(1) & ~was_inside)
        for t in np.flatnonzero(~prefix):
            evict = [-1] if used[t] < slots else np.flatnonzero(mask[:, t] & (counts > floor))
            if len(evict) and len(inside):
                e, f = np.meshgrid(inside, evict, indexing="ij")
                rows.append(np.stack([e.ravel(), np.full(e.size, t), f.ravel()], 1))
    return np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)


def _score_subsets(w: np.ndarray, mask: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (cost, max load) after each candidate move, via subset sums. cand: [K, 3]; returns [K], [K]."""
    n = mask.shape[1]
    subsets = _subset_tables(n)[0]
    bits = mask @ (1 << np.arange(n))
    g = _subset_sums(w, mask)
    cost, level = [], []
    for lo in range(0, len(cand), max(1, _CELLS >> n)):
        e, t, f = cand[lo : lo + max(1, _CELLS >> n)].T
        me, bt = bits[e][:, None], (1 << t)[:, None]
        mf = np.where(f >= 0, bits[f], 0)[:, None]
        gone = ((subsets & me) == me) & ((subsets & (me | bt)) != (me | bt))  # e no longer forced inside
        came = ((subsets & (mf & ~bt)) == (mf & ~bt)) & ((subsets & mf) != mf)  # f newly forced inside
        wf = np.where(f >= 0, w[f], 0.0)[:, None]
        got = _hull_cost(g[None] - w[e][:, None] * gone + wf * came, n, float(w.sum()) / n)
        cost.append(got[0])
        level.append(got[1])
    return np.concatenate(cost), np.concatenate(level)


def _score_flows(w: np.ndarray, mask: np.ndarray, cand: np.ndarray, cur: Key) -> tuple[np.ndarray, np.ndarray]:
    """Exact (cost, max load) by max-flow for the PRUNED_CANDIDATES most promising moves; others get inf."""
    stage_of = np.zeros(mask.shape[1])
    for level, shards in cur.stages:
        stage_of[shards] = level
    counts = mask.sum(1)
    e, t, f = cand.T
    sits = np.where(mask, stage_of, np.inf).min(1)  # [E] level an expert's tokens sit at
    room = sits[e] - stage_of[t] + np.where(f >= 0, w[f] / counts[f], 0.0)
    order = np.lexsort((np.where(f >= 0, w[f], 0.0), -np.minimum(w[e], room)))[:PRUNED_CANDIDATES]
    cost, level = np.full(len(cand), np.inf), np.full(len(cand), np.inf)
    for k in order:
        trial = mask.copy()
        trial[e[k], t[k]] = True
        if f[k] >= 0:
            trial[f[k], t[k]] = False
        got = key(w, trial)
        cost[k], level[k] = got.cost, got.level
    return cost, level


def best_move(w: np.ndarray, mask: np.ndarray, slots: int, cur: Key, floor: int = 1) -> Move | None:
    """The single copy creation (possibly replacing a spare copy) that most lowers the cost without raising
    the max load, if any does.

    w: [E] tokens, mask: [E, N] bool layout, slots: copies a shard may hold, cur: key(w, mask).
    """
    cand = candidates(w, mask, slots, cur, floor)
    if not len(cand):
        return None
    if mask.shape[1] <= ZETA_MAX_SHARDS:
        cost, level = _score_subsets(w, mask, cand)
    else:
        cost, level = _score_flows(w, mask, cand, cur)
    cost = np.where(level <= cur.level * (1 + _SAME), cost, np.inf)
    step = np.round(cost / max(cur.cost, 1e-300), 9)
    k = np.lexsort((np.where(cand[:, 2] >= 0, w[cand[:, 2]], -1.0), step))[0]
    if not cost[k] < cur.cost * (1 - _SAME):
        return None
    e, t, f = (int(x) for x in cand[k])
    return Move(e, t, f, float(cost[k]))
