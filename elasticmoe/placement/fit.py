"""Fit a layer's copies to its shards: drop what no longer fits, re-place experts left without a copy, min copies."""

from __future__ import annotations

import numpy as np


def adapt(w: np.ndarray, holds: np.ndarray, weights: np.ndarray, n: int, slots: int) -> tuple[np.ndarray, int]:
    """Fit a current layer to n shards of `slots` slots: drop copies on removed shards and over full ones
    (spare copies of replicated experts first, least tokens first), then re-place experts left with none.

    w: [E], holds/weights: [E, N_old] copies and shares. Returns (holds [E, n], forced moves).
    """
    mask = np.zeros((len(w), n), bool)
    keep = min(n, holds.shape[1])
    mask[:, :keep] = holds[:, :keep]
    tokens = w[:, None] * weights[:, :keep]
    for s in np.flatnonzero(mask.sum(0) > slots):
        while mask[:, s].sum() > slots:
            on = np.flatnonzero(mask[:, s])
            mask[on[np.lexsort((tokens[on, s], mask[on].sum(1) < 2))[0]], s] = False
    forced = 0
    for e in sorted(np.flatnonzero(~mask.any(1)), key=lambda e: -w[e]):
        counts = np.maximum(mask.sum(1), 1)
        free = np.flatnonzero(mask.sum(0) < slots)
        if len(free):
            s = free[np.argmin(((w / counts) @ mask)[free])]
        else:
            f, s = np.argwhere(mask & (counts > 1)[:, None]).T
            k = np.argmin(w[f] / counts[f])
            f, s = f[k], s[k]
            mask[f, s] = False
        mask[e, s] = True
        forced += 1
    return mask, forced


def redundancy(w: np.ndarray, mask: np.ndarray, k: int, slots: int) -> tuple[np.ndarray, int]:
    """Give every expert >= k copies, heaviest short expert first, one copy at a time (see _add_copy). Always
    succeeds when n * slots >= k * E and n >= k; never takes an expert below k (only copies above it give way).

    w: [E], mask: [E, N] holds (updated in place). Returns (mask, copies added).
    """
    added = 0
    for e in sorted(np.flatnonzero(mask.sum(1) < k), key=lambda e: -w[e]):
        while mask[e].sum() < k:
            made = _add_copy(w, mask, int(e), k, slots)
            if not made:
                break
            added += made
    return mask, added


def _add_copy(w: np.ndarray, mask: np.ndarray, e: int, k: int, slots: int) -> int:
    """One more copy of e on a shard without one: a free slot on the least-loaded such shard, else in place of
    a surplus copy (its expert keeps > k copies; lightest load per copy first), else on a full shard u whose
    copy of some f moves first to a shard t that holds e and has a free slot.

    Surplus copies of f (> k > copies of e) are always on some shard without e, so the last case has none;
    then n * slots >= k * E leaves a free slot, on a shard with e. w: [E], mask: [E, N] (updated in place).
    Returns the copies created (0: no room anywhere, 1, or 2).
    """
    counts = mask.sum(1)
    per = w / np.maximum(counts, 1)  # [E]
    level, room = per @ mask, mask.sum(0) < slots  # [N]
    free = np.flatnonzero(room & ~mask[e])
    if len(free):
        mask[e, free[np.argmin(level[free])]] = True
        return 1
    f, u = _lightest(per, level, mask & (counts > k)[:, None] & ~mask[e])
    if f >= 0:
        mask[f, u], mask[e, u] = False, True
        return 1
    roomy = np.flatnonzero(room)  # all on shards with e
    if not len(roomy):
        return 0
    t = roomy[np.argmin(level[roomy])]
    f, u = _lightest(per, level, mask & ~mask[e] & ~mask[:, [t]])  # exists: u's `slots` copies do not fit in t
    mask[f, u], mask[f, t], mask[e, u] = False, True, True
    return 2


def top_up(w: np.ndarray, mask: np.ndarray, targets: np.ndarray, k: int, slots: int) -> tuple[np.ndarray, int]:
    """Give experts below k copies more on the shards `targets` only (the others stay as they are), heaviest short
    expert first: a free slot on the least-loaded target without one, else in place of a surplus copy there (its
    expert keeps > k copies; lightest load per copy first).

    w: [E], mask: [E, N] holds (updated in place), targets: [N] bool. Returns (mask, copies added).
    """
    added = 0
    for e in sorted(np.flatnonzero(mask.sum(1) < k), key=lambda e: -w[e]):
        while mask[e].sum() < k:
            counts = mask.sum(1)
            per = w / np.maximum(counts, 1)  # [E]
            level, room = per @ mask, targets & ~mask[e] & (mask.sum(0) < slots)  # [N]
            if room.any():
                free = np.flatnonzero(room)
                mask[e, free[np.argmin(level[free])]] = True
            else:
                f, u = _lightest(per, level, mask & (counts > k)[:, None] & (targets & ~mask[e]))
                if f < 0:
                    break
                mask[f, u], mask[e, u] = False, True
            added += 1
    return mask, added


def _lightest(per: np.ndarray, level: np.ndarray, cand: np.ndarray) -> tuple[int, int]:
    """The candidate copy (expert, shard) of least load per copy, then on the least-loaded shard; (-1, -1) if
    none. per: [E], level: [N], cand: [E, N] bool."""
    f, s = np.nonzero(cand)
    if not len(f):
        return -1, -1
    i = np.lexsort((level[s], per[f]))[0]
    return int(f[i]), int(s[i])
