"""Optimal token shares for a fixed expert-to-shard layout: min-max shard load by max-flow (lexicographic)."""

from __future__ import annotations

import numpy as np

_REL_TOL = 1e-9  # flow amounts below this fraction of the layer's tokens count as zero
_TIGHT_TOL = 1e-7  # a shard within this fraction of the level counts as full


class _Net:
    """Tiny Dinic max-flow over float capacities (residual graph as paired edge arrays)."""

    def __init__(self, n: int):
        self.n = n
        self.head: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def edge(self, u: int, v: int, c: float) -> int:
        """Add u->v with capacity c; returns the edge id (its flow is cap[id ^ 1])."""
        self.head[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(c)
        self.head[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)
        return len(self.to) - 2

    def _levels(self, s: int, tol: float) -> list[int]:
        lvl = [-1] * self.n
        lvl[s] = 0
        queue = [s]
        for u in queue:
            for i in self.head[u]:
                v = self.to[i]
                if lvl[v] < 0 and self.cap[i] > tol:
                    lvl[v] = lvl[u] + 1
                    queue.append(v)
        return lvl

    def _push(self, u: int, t: int, f: float, lvl: list[int], it: list[int], tol: float) -> float:
        if u == t:
            return f
        head = self.head[u]
        while it[u] < len(head):
            i = head[it[u]]
            v = self.to[i]
            if self.cap[i] > tol and lvl[v] == lvl[u] + 1:
                d = self._push(v, t, min(f, self.cap[i]), lvl, it, tol)
                if d > tol:
                    self.cap[i] -= d
                    self.cap[i ^ 1] += d
                    return d
            it[u] += 1
        return 0.0

    def run(self, s: int, t: int, tol: float) -> tuple[float, list[int]]:
        """Max flow s->t; returns (value, BFS levels of the final residual graph: >= 0 = source side)."""
        total = 0.0
        while True:
            lvl = self._levels(s, tol)
            if lvl[t] < 0:
                return total, lvl
            it = [0] * self.n
            while (f := self._push(s, t, float("inf"), lvl, it, tol)) > tol:
                total += f


def _route(w: np.ndarray, mask: np.ndarray, level: float, tol: float):
    """Route replicated experts into shards filled up to `level`.

    w: [E] tokens, mask: [E, N] copies. Single-copy experts are fixed base load.
    Returns (routed, flow [E, N] of the replicated experts, source-side shard mask [N]).
    """
    n_exp, n_sh = mask.shape
    counts = mask.sum(1)
    base = (w * (counts == 1)) @ mask
    rep = np.flatnonzero((counts > 1) & (w > 0))
    net = _Net(len(rep) + n_sh + 2)
    src, snk = 0, len(rep) + n_sh + 1
    edges = []
    for k, e in enumerate(rep):
        net.edge(src, 1 + k, float(w[e]))
        edges.append([(s, net.edge(1 + k, 1 + len(rep) + s, float("inf"))) for s in np.flatnonzero(mask[e])])
    for s in range(n_sh):
        net.edge(1 + len(rep) + s, snk, max(0.0, level - float(base[s])))
    routed, lvl = net.run(src, snk, tol)
    flow = np.zeros((n_exp, n_sh))
    for k, e in enumerate(rep):
        for s, i in edges[k]:
            flow[e, s] = net.cap[i ^ 1]
    return routed, flow, np.array([lvl[1 + len(rep) + s] >= 0 for s in range(n_sh)], bool)


def _density(w: np.ndarray, mask: np.ndarray, shards: np.ndarray) -> float:
    """Tokens that must land on `shards` (experts with every copy there) per shard."""
    inside = ~(mask & ~shards).any(1)
    return float(w[inside].sum()) / max(1, int(shards.sum()))


def min_max(w: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
    """Lowest achievable max shard load and a flow reaching it (Dinkelbach over min cuts).

    w: [E] tokens (>= 0), mask: [E, N] bool with >= 1 copy per expert.
    Returns (level, flow [E, N]) with flow rows summing to w and every column <= level.
    """
    counts = mask.sum(1)
    single = (w * (counts == 1)) @ mask
    total = float(w.sum())
    tol = _REL_TOL * max(total, 1e-300)
    level = max(float(single.max(initial=0.0)), total / mask.shape[1])
    need = float(w[(counts > 1) & (w > 0)].sum())
    for _ in range(4 * mask.shape[1] + 8):
        routed, flow, cut = _route(w, mask, level, tol)
        if routed >= need - 4 * tol or not cut.any():
            break
        level = max(_density(w, mask, cut), level + tol)
    flow[counts == 1] = w[counts == 1, None] * mask[counts == 1]
    return level, flow


def tight_shards(mask: np.ndarray, flow: np.ndarray, level: float) -> np.ndarray:
    """Shards at `level` that cannot pass load on (maximal densest set). mask, flow: [E, N]; returns [N] bool."""
    load = flow.sum(0)
    tol = _TIGHT_TOL * max(level, 1e-300)
    can_shed = load < level - tol
    carries = flow > tol * 1e-2
    while True:
        relieved = (mask & can_shed).any(1)  # experts with a copy on a shard that has room
        grown = can_shed | (carries & relieved[:, None]).any(0)
        if (grown == can_shed).all():
            return ~can_shed
        can_shed = grown


def balance(w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[tuple[float, np.ndarray]]]:
    """Lexicographically min-max token flow: peel the tightest shard set, recurse on the rest.

    w: [E] tokens (>= 0), mask: [E, N] bool, >= 1 copy per expert.
    Returns (flow [E, N] with rows summing to w, stages [(level, shards [N] bool), ...] from the top down).
    """
    flow = np.zeros(mask.shape)
    stages: list[tuple[float, np.ndarray]] = []
    experts = np.arange(mask.shape[0])
    shards = np.arange(mask.shape[1])
    sub = mask.copy()
    while len(shards):
        if (sub.sum(1) == 1).all():
            flow[np.ix_(experts, shards)] = w[experts, None] * sub
            load = w[experts] @ sub
            stages += [(float(x), np.isin(np.arange(mask.shape[1]), shards[load == x])) for x in np.unique(load)[::-1]]
            break
        level, part = min_max(w[experts], sub)
        tight = tight_shards(sub, part, level)
        if not tight.any():
            tight[:] = True
        inside = ~(sub & ~tight).any(1)
        flow[np.ix_(experts[inside], shards)] = part[inside]
        stages.append((level, np.isin(np.arange(mask.shape[1]), shards[tight])))
        experts, shards = experts[~inside], shards[~tight]
        sub = sub[np.ix_(~inside, ~tight)]
    return flow, stages


def shares(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-copy token fractions of the lexicographic min-max flow. w: [E], mask: [E, N]; returns [E, N]."""
    flow = np.where(mask, np.maximum(balance(w, mask)[0], 0.0), 0.0)
    routed = flow.sum(1, keepdims=True)
    even = mask / mask.sum(1, keepdims=True)
    return np.where(routed > 0, flow / np.where(routed > 0, routed, 1.0), even)
