"""Random sequences of membership changes over real in-process shards (joins, replicas still loading, kills found
by the health round or by a gateway's report, drains, rebalances on random loads, controller restarts, a failed load
rolling a drain or a rebalance back), with a gateway polling the table throughout: every table it runs routes only to
copies the shards hold (make-before-break), every placement is valid and keeps expert_copies, every expert has a live
copy after each change, and once the drops are through every live shard holds exactly its assignment."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from elasticmoe.autoscaler import moves, replace
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.model import open_model
from tests.controller_util import E, ControllerImpl, Shard, _args, _routed_to, _until
from tests.controller_util import model  # noqa: F401 - a fixture

OPS = ("join", "start", "finish", "kill", "report", "drain", "rebalance", "restart", "failload", "failload")


class _Run:
    """One random sequence: the controller, its shards, a polling gateway and what went wrong."""

    def __init__(self, model: str, seed: int):
        self.model, self.rng = model, np.random.default_rng(seed)
        self.files = open_model(model)
        self.n0 = int(self.rng.integers(1, 4))
        self.copies = int(self.rng.integers(1, min(2, self.n0) + 1))
        self.shards: dict[str, Shard] = {}
        self.dead: set[str] = set()
        self.starting: list[Shard] = []
        self.names = iter("abcdefghijklmnopqrstuvwxyz")
        self.problems: list = []
        self.table: dict = {}
        self.ctrl = None

    def new_controller(self):
        return ControllerImpl(_args(self.model, num_shards=self.n0, expert_copies=self.copies))

    def shard(self) -> Shard:
        s = Shard(self.files, next(self.names))
        self.shards[s.shard_id] = s
        return s

    def check_gateway(self, where) -> None:
        """The table the gateway runs routes only to copies held (shards killed by the test aside: failover's)."""
        for s in self.table["shards"]:
            if s["id"] not in self.dead:
                missing = _routed_to(self.table, s["id"]) - self.shards[s["id"]].held()
                if missing:
                    self.problems.append((where, "routed but not held", s["id"], sorted(missing)))

    async def gateway(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = await self.ctrl.table(self.table["version"], "g", 0.02, self.table["epoch"])
            if t is not None:
                self.table = t
            self.check_gateway("gateway")
            await asyncio.sleep(0.01)

    def quiet(self) -> None:
        for task in list(self.ctrl._tasks):
            if task.get_coro().__qualname__.endswith("_forever"):  # the loops: this test runs the rounds itself
                task.cancel()


async def _step(run: _Run, op: str) -> str:
    ctrl, rng = run.ctrl, run.rng
    live = [s.shard_id for s in ctrl.registry.live()]
    if op in ("kill", "report") and len(live) >= 2:
        sid = str(rng.choice(live))
        run.shards[sid].server.stop(None)
        run.dead.add(sid)
        if op == "report":
            await ctrl.report_failure(sid)
            await _until(lambda: sid not in ctrl.registry.shards or not ctrl.registry.shards[sid].healthy, 10,
                         "the report's check")
        return f"{op} {sid}"
    if op == "failload" and live:  # every live shard's next load fails: the change is rolled back
        for sid in live:
            run.shards[sid].servicer.faults.fail_loads = 1
        try:
            if len(live) >= 2 and rng.random() < 0.5:
                sid = str(rng.choice(live))
                for other in live:  # every try of the drain fails (tests/test_controller_drain.py: one that does not)
                    run.shards[other].servicer.faults.fail_loads = replace.DRAIN_ATTEMPTS
                drained = (await ctrl.drain(sid))["drained"]
                what = f"drain {sid}" + ("" if drained else " rolled back")
            else:
                ctrl.load.ema = rng.exponential(1.0, ctrl.load.ema.shape) ** 3 * 100
                try:
                    await ctrl.rebalance()
                    what = "rebalance"
                except moves.LoadFailed:
                    what = "rebalance rolled back"
        finally:
            for sid in live:
                run.shards[sid].servicer.faults.fail_loads = 0
        return f"failload {what}"
    if op == "drain" and len(live) >= 2:
        sid = str(rng.choice(live))
        await ctrl.drain(sid)
        return f"drain {sid}"
    if op == "join" and len(run.shards) - len(run.dead) < 5:
        s = run.shard()
        await s.join(ctrl)
        return f"join {s.shard_id}"
    if op == "start" and not run.starting and len(run.shards) - len(run.dead) < 5:
        s = run.shard()
        plan = await ctrl.register(s.shard_id, s.address)
        s.store.load(plan["experts"])
        run.starting.append(s)
        return f"start {s.shard_id}"
    if op == "finish" and run.starting:
        s = run.starting.pop()
        if s.shard_id in ctrl.registry.shards:
            await ctrl.ready(s.shard_id)
        return f"finish {s.shard_id}"
    if op == "restart":
        for task in list(ctrl._tasks):
            task.cancel()
        version = ctrl.registry.version
        run.ctrl = ctrl = run.new_controller()
        assert ctrl.recovering and ctrl.registry.version > version
        ctrl._start()
        await _until(lambda: not ctrl.recovering, 10, "recovery")
        run.quiet()
        return "restart"
    ctrl.load.ema = rng.exponential(1.0, ctrl.load.ema.shape) ** 3 * 100  # a skewed measured load
    await ctrl.rebalance()
    return "rebalance"


def _check_state(run: _Run, where) -> None:
    reg = run.ctrl.registry
    p = reg.placement
    try:
        p.validate()
    except ValueError as e:
        run.problems.append((where, "invalid placement", str(e)))
    k = min(run.copies, p.num_shards)
    if p.num_shards * p.slots_per_shard >= k * E and (p.num_copies() < k).any():
        run.problems.append((where, "fewer than expert_copies", p.num_copies().tolist()))
    positions = [s.position for s in reg.shards.values()]
    if len(set(positions)) != len(positions):
        run.problems.append((where, "shared positions", positions))
    if not run.starting and not reg.complete():
        run.problems.append((where, "an expert without a live copy"))


@pytest.mark.parametrize("seed", [int(x) for x in os.environ.get("ELASTICMOE_SEQ_SEEDS", "1,3").split(",")])
def test_random_membership_sequences_keep_every_table_served(model, seed, monkeypatch):  # noqa: F811
    monkeypatch.setattr(moves, "GATEWAY_TTL_S", 2.0)  # a restarted controller's wait for unheard gateways
    GcsRecord("default").clear()
    run = _Run(model, seed)

    async def scenario():
        run.ctrl = run.new_controller()
        for _ in range(run.n0):
            await run.shard().join(run.ctrl)
        run.quiet()
        run.table = await run.ctrl.table(-1, "g")
        stop = asyncio.Event()
        gateway = asyncio.ensure_future(run.gateway(stop))
        done = []
        try:
            ops = [*run.rng.permutation(OPS), *run.rng.choice(OPS, 4)]  # each kind at least once (when it applies)
            for i, op in enumerate(ops):
                done.append(await _step(run, str(op)))
                await run.ctrl._health_once()
                _check_state(run, (i, done[-1]))
                run.check_gateway((i, done[-1]))
            for s in run.starting:
                await run.ctrl.ready(s.shard_id)
            reg = run.ctrl.registry
            exact = lambda: all(run.shards[s.shard_id].held() == set(reg.assignment(s.position))  # noqa: E731
                                for s in reg.live())
            await _until(exact, 15, f"every live shard holding exactly its assignment after {done}")
        finally:
            stop.set()
            await gateway
            for task in list(run.ctrl._tasks):
                task.cancel()
            for s in run.shards.values():
                s.server.stop(None)
        assert not run.problems, (done, run.problems[:5])
        assert len({op.split()[0] for op in done}) >= 5, done  # the sequence mixed its changes

    asyncio.run(scenario())
