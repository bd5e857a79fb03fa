"""Elasticity policy: per-expert load averages, shard-count decisions, and Serve's autoscaling hook."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from elasticmoe.autoscaler.clocks import wall_minus_monotonic


LEFT_KEPT = 4096  # shards forgotten (left the live set) whose ids are kept: one back is not counted from its start


class LoadTracker:
    """Moving average of tokens per (MoE layer, expert) per second, from shards' cumulative counters."""

    def __init__(self, num_layers: int, num_experts: int, half_life_s: float = 5.0):
        self.ema = np.zeros((num_layers, num_experts))
        self.half_life_s = half_life_s
        self._last: dict[str, dict[tuple[int, int], int]] = {}
        self._last_compute: dict[str, float] = {}
        self._read_at: dict[str, float] = {}  # shard id -> monotonic time of its last read
        self._rate: dict[str, np.ndarray] = {}  # shard id -> its tokens per second over its last measured interval
        self._t = time.monotonic()
        self._first: float | None = None  # monotonic time of the first update (the first stats round)
        self._left: OrderedDict[str, None] = OrderedDict()  # shards read once, then forgotten (the newest LEFT_KEPT)
        self.utilization: dict[str, float] = {}  # shard id -> busy fraction over the last interval
        self.measured: set[str] = set()  # shards whose utilization covers the last interval (not a first read)

    def update(self, stats: dict[str, tuple[dict[tuple[int, int], int], float]], layer_index: dict[int, int],
               unread: Iterable[str] = (), uptime: dict[str, float] | None = None) -> None:
        """stats: shard id -> ({(model layer, expert): cumulative tokens}, cumulative compute seconds); unread: live
        shards whose read failed this round; uptime: shard id -> seconds since it started (GetStats' uptime_s).

        A shard first read that started after this tracker's first round and was never read before (a scale out's,
        a replacement's) is counted from its start: it served no token before it went live, which was after the last
        round that did not read it, so all its tokens are this round's (as a baseline only, a new shard's experts
        lost its share of their load for a round: 13% of it in the EMA at 1 s rounds, 5 s half-life). Its busy time
        is not measured until its next read. Any other shard first seen (met by a restarted controller, or one back
        in the live set) only sets its baseline: counters it built up before are not tokens of this interval. An
        unread shard keeps its baseline and counts at its last rate this
        round (its next read covers the whole time since it was last read): as 0 tokens/s, a missed read took a
        quarter off its experts' load (two rounds: that one and the baseline after it), which the next rebalance
        re-shared to, piling the other shards' tokens onto it. A shard neither read nor unread is forgotten."""
        now = time.monotonic()
        dt = max(now - self._t, 1e-3)
        self._t = now
        rate = np.zeros_like(self.ema)
        first, self._first = self._first is None, now if self._first is None else self._first
        self.measured = {shard for shard in stats if shard in self._last}
        held = {shard for shard in unread if shard not in stats and shard in self._last}
        for shard in held & set(self._rate):
            rate += self._rate[shard]
        for shard, (tokens, compute) in stats.items():
            span = max(now - self._read_at.get(shard, now), 1e-3)  # more than dt after missed reads
            if shard in self._last:
                self._rate[shard] = self._per_second(self._last[shard], tokens, span, layer_index)
                rate += self._rate[shard]
            elif not first and shard not in self._left and now - (uptime or {}).get(shard, math.inf) > self._first:
                self._rate[shard] = self._per_second({}, tokens, dt, layer_index)  # from its start: this round's
                rate += self._rate[shard]
            self.utilization[shard] = max(0.0, compute - self._last_compute.get(shard, compute)) / span
            self._last[shard], self._last_compute[shard], self._read_at[shard] = dict(tokens), compute, now
        for gone in set(self._last) - set(stats) - held:
            for kept in (self._last, self._last_compute, self._read_at, self._rate, self.utilization):
                kept.pop(gone, None)
            self._left[gone] = None
            while len(self._left) > LEFT_KEPT:
                self._left.popitem(last=False)
        alpha = 1 - 0.5 ** (dt / self.half_life_s)
        self.ema = (1 - alpha) * self.ema + alpha * rate

    def _per_second(self, prev: dict, tokens: dict, span: float, layer_index: dict[int, int]) -> np.ndarray:
        """One shard's tokens per second since its last read (a counter that went back, a restart: none). [L, E]"""
        out = np.zeros_like(self.ema)
        for key, n in tokens.items():
            if key[0] in layer_index:
                out[layer_index[key[0]], key[1]] += max(0, n - prev.get(key, 0)) / span
        return out

    def planning_load(self) -> np.ndarray:
        """The EMA plus a small uniform prior, so an idle cluster still spreads experts evenly. [L, E]"""
        floor = max(float(self.ema.mean()), 1.0) * 1e-3
        return self.ema + floor


SCALE_IN_LEFT = 0.75  # a scale in leaves the shards at most this much of the target (then a third more scales out)


@dataclass
class ScaleDecider:
    """Shard count from utilization with hysteresis and a cool-down; an operator override wins. Out to the shards
    that run the work at the target; in by one when the shards asked for run under half of it and one fewer would
    run at most SCALE_IN_LEFT of it (from 2 shards, half the target on each is the whole target on the one left,
    which a load jittering around it scaled out from again: a flap every cool-down). No scale in before the cluster
    is up (`started`) and has run for a cool-down (its warm-up): before any request, every shard is idle. Scaling out
    is never held by it."""

    min_shards: int
    max_shards: int
    target_utilization: float
    cooldown_s: float = 30.0
    override: int | None = None
    _last_change: float = field(default=-math.inf)  # monotonic time of the last change: none yet
    _scale_in_from: float = field(default=math.inf)  # monotonic time from which a scale in may be asked for

    def started(self) -> bool:
        """Every position of the placement is live: the warm-up starts (the first call only: True)."""
        if self._scale_in_from == math.inf:
            self._scale_in_from = time.monotonic() + self.cooldown_s
            return True
        return False

    def state(self) -> dict:
        """The last change, the warm-up's end and its start as wall-clock times (None: none yet, not started), for
        the controller's record: a restarted controller's monotonic clock is another's."""
        wall = wall_minus_monotonic(time)
        since = None if self._scale_in_from == math.inf else self._scale_in_from + wall
        return {"last_change": None if self._last_change == -math.inf else self._last_change + wall,
                "scale_in_from": since, "started": None if since is None else since - self.cooldown_s}

    def resume(self, state: dict) -> None:
        """Take `state()` of the decider this one follows: its cool-down and warm-up go on, not start over, with this
        one's `cooldown_s` (a redeploy may have changed it): a warm-up still running ends this long after its start;
        one over before stays over."""
        now, mono = time.time(), -wall_minus_monotonic(time)
        last, since, started = state.get("last_change"), state.get("scale_in_from"), state.get("started")
        last = -math.inf if last is None else float(last) + mono  # all read before any is taken
        if since is not None and started is not None and float(since) > now:
            since = float(started) + self.cooldown_s
        self._scale_in_from = math.inf if since is None else float(since) + mono
        self._last_change = last

    def desired(self, current: int, utilization: list[float]) -> int:
        lo, hi = self.min_shards, self.max_shards
        if self.override is not None:  # the operator's change starts the cool-down like any other
            want = max(lo, min(hi, self.override))
            if want != current:
                self._last_change = time.monotonic()
            return want
        if not utilization or time.monotonic() - self._last_change < self.cooldown_s:
            return max(lo, min(hi, current))
        work = sum(utilization)  # busy shards' worth of compute on the live shards
        want = current
        if work / len(utilization) > self.target_utilization:  # at the target (shards still starting add none)
            want = max(current, math.ceil(work / self.target_utilization - 1e-9))  # 4.2 / 0.6 is 7.000000000000001
        elif current > lo and work / current < self.target_utilization / 2 and \
                work / (current - 1) <= SCALE_IN_LEFT * self.target_utilization:  # over the shards asked for, less one
            if time.monotonic() >= self._scale_in_from:  # else starting or warming up: idle says nothing yet
                want = current - 1
        want = max(lo, min(hi, want))
        if want != current:
            self._last_change = time.monotonic()
        return want


def shard_autoscaling_policy(ctx) -> tuple[int, dict]:
    """Serve autoscaling policy for the ExpertShard deployment: follow the controller's desired count.

    Every shard replica reports the controller's `desired_shards` as a custom metric; the max wins. A replica the
    controller has not answered yet reports none; with no report at all the count stays.
    """
    metrics = ctx.aggregated_metrics or {}
    reported = list((metrics.get("desired_shards") or {}).values())
    want = int(round(max(reported))) if reported else ctx.target_num_replicas
    want = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, want))
    return want, ctx.policy_state
