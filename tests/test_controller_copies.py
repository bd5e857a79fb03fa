"""A re-home (a dead or drained shard's experts moved onto the live shards) while another shard still loads its
assignment keeps expert_copies where the slots allow; over real in-process shards with a gateway polling the table
(tests/test_controller_drain.py's)."""

from __future__ import annotations

import asyncio

import pytest

from tests.controller_util import E
from tests.controller_util import model  # noqa: F401 - a fixture
from tests.test_controller_drain import _with_gateway
from tests.test_controller_sequences import _check_state


@pytest.mark.parametrize("how", ["dies", "drains"])
def test_a_re_home_while_a_shard_loads_keeps_expert_copies(model, how):
    """2 copies of each expert on 3 positions: a and b live, c registered and loaded its plan, not ready yet. b
    dies (found by the health round) or drains. The plan gave every expert one copy on a (the only live shard: all
    8 slots) and c kept its assignment as it was, so the experts c does not hold were left with one copy while 2
    positions of 8 slots fit 2 of each, and nothing brought the second back (no rebalance without autoscaling).
    Now c's position also gets copies of the experts short of 2 (c loads them before it is published: ready());
    every expert still has a live copy on a meanwhile."""
    async def scenario(run, a, b, c):
        planned = c.held()
        if how == "dies":
            b.server.stop(None)
            run.dead.add("b")
            await run.ctrl._health_once()
        else:
            assert (await run.ctrl.drain("b"))["drained"]
        reg = run.ctrl.registry
        assert "b" not in reg.shards and reg.complete() and [s.shard_id for s in reg.live()] == ["a"]
        _check_state(run, "re-home")
        assert not run.problems, run.problems  # before: "fewer than expert_copies"
        assert set(reg.assignment(reg.shards["c"].position)) > planned  # its load still counts, with more to come
        assert c.held() == planned  # nothing loaded onto c while it loads (its own load holds its store's lock)
        run.starting.clear()
        await run.ctrl.ready("c")
        await asyncio.sleep(0.1)  # the gateway's next poll
        assert (reg.placement.num_copies() == 2).all() and len(run.table["shards"]) == 2
        assert c.held() == set(reg.assignment(reg.shards["c"].position))
        assert {(int(l), e) for l in run.table["layers"] for e in range(E)} <= a.held()
        _check_state(run, "c ready")

    _with_gateway(model, 3, scenario, copies=2, loading=1)
