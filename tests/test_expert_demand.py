"""The per-expert load the controller reads from the shards is the routed demand, each token-slot the router
assigned once: over real in-process shards, a real controller's stats round and a real gateway dispatcher (a plain
step, a hedged one, re-sends of malformed and `missing` answers and of calls past their deadline, micro-batches of a
real engine), and a shard's first read after a scale out counts its tokens."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from tests.controller_util import E, Shard, _quiet, _with_shards
from tests.controller_util import model  # noqa: F401 - a fixture

K, T = 2, 24


def _inputs(files, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    return torch.randn(T, files.spec.hidden_size, generator=g), ids, torch.rand(T, K, generator=g)


class _Steps:
    """Steps dispatched at one MoE layer, and the token-slots the router assigned them per (layer, expert)."""

    def __init__(self, files, d: GrpcDispatcher):
        self.files, self.d, self.layer = files, d, files.spec.moe.moe_layers[0]
        self.routed = np.zeros((len(files.spec.moe.moe_layers), E), dtype=np.int64)  # [L, E]

    def run(self, seed: int) -> None:
        hidden, ids, weights = _inputs(self.files, seed)
        self.d.dispatch(self.layer, hidden, ids, weights).wait()
        np.add.at(self.routed[0], ids.flatten().numpy(), 1)


def _counted(ctrl) -> np.ndarray:
    """[L, E] the counters the controller's load tracker measures the shards' tokens from, summed over shards."""
    out = np.zeros((len(ctrl.moe_layers), E), dtype=np.int64)
    for counters in ctrl.load._last.values():
        for (layer, e), n in counters.items():
            out[ctrl.layer_index[layer], e] += n
    return out


def _served(shards) -> int:
    return sum(sum(s.store.stats().tokens.values()) for s in shards)


async def _over_two(model, a, b, transport: str, **dispatcher):  # noqa: F811
    """A controller over a and b (every expert on both) after its baseline round; a dispatcher on its table."""
    ctrl = await _quiet(model, a, b, expert_copies=2)
    await ctrl._stats_once()
    d = GrpcDispatcher(transport=transport, **{"timeout_s": 10, **dispatcher})
    d.set_table(RoutingTable.from_dict(ctrl._table()))
    return ctrl, d


async def _until_served(shards, calls: int) -> None:
    deadline = time.monotonic() + 10
    while sum(s.store.stats().calls for s in shards) < calls and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("transport", ["unary", "socket"])
def test_a_hedged_step_counts_its_slots_once(model, transport):  # noqa: F811
    """A straggling copy (1 s) is hedged onto the other; both serve the slots. Served work counts both (the
    shards' `tokens`); the controller's load counts the router's slots once: the hedge is marked a duplicate."""
    async def scenario(files, a, b):
        ctrl, d = await _over_two(model, a, b, transport, hedge_min_s=0.3, suspect_s=0.1)
        steps = _Steps(files, d)
        try:
            for seed in range(5):  # round trips for the hedge delay; plain steps count exactly
                await asyncio.to_thread(steps.run, seed)
            await ctrl._stats_once()
            np.testing.assert_array_equal(_counted(ctrl), steps.routed)
            calls, hedges = a.store.stats().calls + b.store.stats().calls, d.hedges
            a.servicer.faults.run_delay_s = 1.0
            await asyncio.to_thread(steps.run, 5)
            await _until_served([a, b], calls + 3)  # a's call, then b's own and its hedge of a's
            a.servicer.faults.run_delay_s = 0.0
        finally:
            d.close()
        assert d.hedges > hedges
        await ctrl._stats_once()
        assert _served([a, b]) > steps.routed.sum()  # the hedged slots were computed twice
        np.testing.assert_array_equal(_counted(ctrl), steps.routed)

    _with_shards(model, "ab", scenario)


def test_a_re_send_of_a_malformed_answer_counts_once(model):  # noqa: F811
    """A shard answers malformed (it computed, and counted, the slots): the re-send to the other copy is a
    duplicate. A `missing` answer counts nothing where it was refused: its re-send counts."""
    async def scenario(files, a, b):
        ctrl, d = await _over_two(model, a, b, "socket", hedge_min_s=30)
        steps = _Steps(files, d)
        try:
            b.servicer.faults.malformed_outputs = 1
            await asyncio.to_thread(steps.run, 0)
            assert d.failovers == 1 and _served([a, b]) > steps.routed.sum()
            a.store.drop([(steps.layer, e) for e in range(E // 2)])  # the table still lists them on a: `missing`
            await asyncio.to_thread(steps.run, 1)
            assert d.failovers >= 2
        finally:
            d.close()
        await ctrl._stats_once()
        np.testing.assert_array_equal(_counted(ctrl), steps.routed)

    _with_shards(model, "ab", scenario)


@pytest.mark.parametrize("transport", ["unary", "socket"])
def test_a_re_send_after_a_deadline_counts_once(model, transport):  # noqa: F811
    """a is slow (1.5 s) past the calls' deadline (0.5 s), before any hedge (its delay is 30 s): its call fails and
    is re-sent to b. a, alive, computes it late and counts it: the re-send went unmarked and b counted the slots
    again (216 counted for 192 routed). It now goes as a duplicate: the slots count once."""
    async def scenario(files, a, b):
        ctrl, d = await _over_two(model, a, b, transport, hedge_min_s=30)
        steps = _Steps(files, d)
        try:
            for seed in range(3):  # the channels and connections open within the default deadline
                await asyncio.to_thread(steps.run, seed)
            calls, failovers = a.store.stats().calls + b.store.stats().calls, d.failovers
            a.servicer.faults.run_delay_s, d.timeout_s = 1.5, 0.5
            await asyncio.to_thread(steps.run, 3)
            assert d.failovers == failovers + 1 and d.hedges == 0  # a's call, re-sent to b
            await _until_served([a, b], calls + 3)  # b's own call and the re-send; a's, late
            a.servicer.faults.run_delay_s = 0.0
        finally:
            d.close()
        assert _served([a, b]) > steps.routed.sum()  # a's slots were computed twice
        await ctrl._stats_once()
        np.testing.assert_array_equal(_counted(ctrl), steps.routed)

    _with_shards(model, "ab", scenario)


def test_micro_batches_count_what_the_router_assigned(model):  # noqa: F811
    """A real engine's steps in 2 micro-batches over the dispatcher (each its own call per layer): the controller's
    counts equal the routing the engine's router made (the gateway's elasticmoe_expert_tokens_total)."""
    from elasticmoe.engine.engine import Engine
    from elasticmoe.engine.sampling import SamplingParams
    from elasticmoe.metrics import GatewayMetrics

    async def scenario(files, a, b):
        ctrl, d = await _over_two(model, a, b, "socket")
        spec = files.spec
        metrics = GatewayMetrics("per_expert", spec.num_layers, E, spec.moe.moe_layers, use_ray=False)
        engine = Engine(files, d, max_model_len=64, micro_batches=2, pipeline_min_tokens=2)
        engine.model.route_observer = metrics.route

        def run() -> None:
            greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            for i, prompt in enumerate(["Hi there", "Once upon a time", "The quick brown fox", "Zebra"]):
                engine.add_request(str(i), engine.tokenizer.encode(prompt), greedy)
            while engine.has_work():
                engine.step()
        try:
            await asyncio.to_thread(run)
        finally:
            d.close()
        assert len(d.fanout_overhead_s) > engine.steps * len(spec.moe.moe_layers)  # micro-batches: more calls
        await ctrl._stats_once()
        routed = metrics.expert_token_totals()[spec.moe.moe_layers]  # [L, E]
        assert routed.sum() > 0
        np.testing.assert_array_equal(_counted(ctrl), routed)

    _with_shards(model, "ab", scenario)


def test_a_new_shards_first_read_counts_its_tokens(model):  # noqa: F811
    """Scale out: b starts after the controller's first round and joins (a spare the placement grows onto); the
    steps run on a and b. The next round's load holds every token of the interval, b's too: its first read counts
    from its start. As a baseline only, b's share was missing from the load for that round."""
    async def scenario(files, a):
        ctrl = await _quiet(model, a, num_shards=1)
        await ctrl._stats_once()
        b = Shard(files, "b")
        try:
            await b.join(ctrl)
            for task in list(ctrl._tasks):
                task.cancel()
            table = RoutingTable.from_dict(ctrl._table())
            assert len(table.shards) == 2
            d = GrpcDispatcher(transport="socket", timeout_s=10)
            d.set_table(table)
            steps = _Steps(files, d)
            try:
                for seed in range(3):
                    await asyncio.to_thread(steps.run, seed)
            finally:
                d.close()
            assert sum(b.store.stats().tokens.values()) > 0
            before, t0 = ctrl.load.ema.copy(), ctrl.load._t
            await ctrl._stats_once()
            dt = ctrl.load._t - t0
            alpha = 1 - 0.5 ** (dt / ctrl.load.half_life_s)
            tokens = (ctrl.load.ema - (1 - alpha) * before) / alpha * dt  # [L, E] the round's tokens, per expert
            np.testing.assert_allclose(tokens, steps.routed, rtol=1e-6, atol=1e-6)
        finally:
            b.server.stop(None)

    _with_shards(model, "a", scenario)
