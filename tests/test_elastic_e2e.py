"""End to end elasticity on a real local Ray: a failed load during a rebalance, hot-expert replication, surviving a
killed shard, scaling 2 -> 3 -> 2, and a shard kill and a controller kill inside the steps of a scale sequence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from tests.serving_util import GRPC, Load, app_entry, deploy, handle, make_skewed_model

pytestmark = pytest.mark.e2e
PROMPTS = [f"Request number {i} asks the experts about {w}" for i, w in
           enumerate(["fish", "the sea", "mountains", "rivers", "a king", "stars", "apples", "the wind"])]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elastic")
    skew = make_skewed_model(tmp / "skew")
    auto = {"min_shards": 2, "max_shards": 3, "rebalance_interval_s": 2.0, "max_moves": 8,
            "target_utilization": 1.0, "slots_per_shard": 6}
    deploy(ray_cluster, [app_entry("skew", skew, 2, autoscaling={**auto, "max_shards": 2}),
                         app_entry("elastic", skew, 2, autoscaling=auto)], tmp / "elastic.yaml")
    llm = LLM(str(skew))
    reference = {p: o.token_ids for p, o in zip(PROMPTS, llm.generate(
        PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)))}
    return reference


def _request(app: str, prompt: str, stream: bool = False) -> list[int]:
    client = GenerationClient(GRPC, app=app)
    if stream:
        return [t for r in client.stream(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
                for t in r.token_ids]
    return list(client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _even_balancedness(st: dict) -> float:
    """Worst-layer balancedness the initial even placement (one copy each) would have under the load the
    controller plans with now: the reference a rebalance must beat."""
    import numpy as np

    from elasticmoe.placement import Placement

    load = np.asarray(st["planning_load"])  # [L, E]
    even = Placement.even(load.shape[0], load.shape[1], st["num_shards"], load.shape[1])
    return float(even.balancedness(load).min())


def test_failed_load_during_rebalance_keeps_serving_and_leaks_nothing(apps):
    """Both shards fail their next LoadExperts (as a crash mid-load would) while load makes the controller re-place:
    the move is rolled back, no shard keeps a copy it was not assigned, every request stays exact, and a later
    rebalance succeeds. First in this module: the placement is still the even one, so the first rebalance moves."""
    def status() -> dict:
        return handle("Controller", "skew").status.remote().result(timeout_s=60)

    _wait(lambda: (s := status())["complete"] and sum(1 for x in s["shards"] if x["ready"] and x["healthy"]) == 2,
          240, "2 live shards and a complete placement")
    shards, armed = handle("ExpertShard", "skew"), set()
    while len(armed) < 2:
        armed.add(shards.inject_faults.remote(fail_loads=1).result()["pid"])
    load = Load("skew", apps, PROMPTS, MAX_TOKENS)
    _wait(lambda: status()["event_counts"].get("load_failed"), 120, "a failed load")
    placed = status()["event_counts"].get("placement", 0)
    _wait(lambda: all(s["held"] == s["experts"] for s in status()["shards"]), 30, "no leaked copies")
    ok = _wait(lambda: (s := status())["event_counts"].get("placement", 0) > placed and s, 180, "a later rebalance")
    load.finish()  # every request exact, none failed
    assert ok["complete"] and len(load.done) > 0


def test_hot_experts_get_replicated_and_balance_rises(apps):
    controller = handle("Controller", "skew")
    outputs: list[bool] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(8) as pool:
            for p, got in zip(PROMPTS, pool.map(lambda p: _request("skew", p), PROMPTS)):
                outputs.append(got == apps[p])
        st = controller.status.remote().result()
        moves = [e for e in st["events"] if e["event"] == "placement" and e["moves"] > 0]
        if moves and min(st["balancedness"]) > _even_balancedness(st) + 0.05:
            break
    assert outputs and all(outputs), "a request diverged from the single-process engine"
    assert moves, "the controller never re-placed experts"
    copies = st["copies"]
    assert max(copies[0][0], copies[0][1]) > 1, f"hot experts not replicated: {copies}"
    assert min(st["balancedness"]) > _even_balancedness(st) + 0.05, (st["balancedness"], _even_balancedness(st))


def test_killed_shard_during_streams_loses_nothing(apps):
    shards = handle("ExpertShard", "elastic")
    pids: set[int] = set()
    for _ in range(50):
        pids.add(shards.info.remote().result()["pid"])
        if len(pids) >= 2:
            break
    assert len(pids) >= 2
    victim = min(pids)
    results: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}  # each stream's token arrival times
    firsts = threading.Semaphore(0)  # released once per stream, at its first tokens

    def run(p):
        toks, times[p] = [], []
        for r in GenerationClient(GRPC, app="elastic").stream(p, max_tokens=MAX_TOKENS, temperature=0.0,
                                                              ignore_eos=True):
            had = bool(toks)
            toks += r.token_ids
            times[p] += [time.time()] * len(r.token_ids)
            if toks and not had:
                firsts.release()
        results[p] = toks

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for _ in PROMPTS:  # the kill follows the last stream's first token at once (it has most of its tokens to go)
        assert firsts.acquire(timeout=120), "a stream had no first token within 120 s"
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    for t in threads:
        t.join(timeout=300)
    assert results == apps, "a stream failed or diverged after the shard was killed"
    assert any(t[0] < killed < t[-1] for t in times.values()), "no stream was mid-way when the shard was killed"
    controller = handle("Controller", "elastic")
    st = _wait(lambda: (s := controller.status.remote().result())["event_counts"].get("removed", 0) >= 1
               and s["complete"] and sum(1 for x in s["shards"] if x["ready"] and x["healthy"]) >= 2 and s,
               240, "the controller to drop the dead shard and the new replica to rejoin")
    assert not any("stats_error" in x for x in st["shards"] if x["ready"] and x["healthy"])  # all live ones answer
    assert all(_request("elastic", p) == apps[p] for p in PROMPTS[:2])


def _scale(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    """`elasticmoe scale --app elastic ...` as an operator runs it, from a shell without the RAY_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-m", "elasticmoe.cli", "scale", "--app", "elastic", *args],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == code, out.stderr[-2000:]
    return out


def test_scale_2_3_2_under_load(apps, ray_cluster):
    controller = handle("Controller", "elastic")
    stop = threading.Event()
    bad: list = []
    done: list[float] = []  # when each exact answer came

    def load():
        i = 0
        while not stop.is_set():
            p = PROMPTS[i % len(PROMPTS)]
            try:
                if _request("elastic", p) != apps[p]:
                    bad.append(("diverged", p))
                else:
                    done.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - counted as a failure
                bad.append(("failed", repr(e)))
            i += 1

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    steps: list[tuple[float, float]] = []  # (scale command sent, shard count reached) per step
    try:
        for n in (3, 2):
            began = time.monotonic()
            assert f"elastic: desired shards {n} (pinned)" in _scale("--shards", str(n)).stdout
            _wait(lambda: (s := controller.status.remote().result())["num_shards"] == n and s["complete"]
                  and sum(1 for x in s["shards"] if x["ready"]) == n, 300, f"{n} shards")
            steps.append((began, time.monotonic()))
            status = ray_cluster.serve_status()
            dep = status["applications"]["elastic"]["deployments"]["ExpertShard"]
            assert dep["status"] in ("HEALTHY", "UPSCALING", "DOWNSCALING")
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert not bad, bad[:5]
    assert not any(w.is_alive() for w in workers), "a load worker hung"
    for a, b in steps:  # the load ran through each step: answers came while it was under way
        assert any(a < t < b for t in done), f"no request completed during the scale step {a:.1f}..{b:.1f}"
    refused = _scale("--shards", "4", code=2)  # beyond max_shards: refused in one line, nothing changed
    assert "shards 4 is outside autoscaling's min_shards..max_shards (2..3)" in refused.stderr
    assert "Traceback" not in refused.stderr and controller.desired_shards.remote().result() == 2


def _scaled(controller, n: int) -> dict:
    """Wait until the placement has n positions, every one with a ready, healthy shard, and no recovery running."""
    return _wait(lambda: (s := controller.status.remote().result())["num_shards"] == n and s["complete"]
                 and not s["recovering"] and sum(1 for x in s["shards"] if x["ready"] and x["healthy"]) == n and s,
                 300, f"{n} live shards and a complete placement")


def test_faults_during_a_scale_sequence_lose_nothing(apps, ray_cluster):
    """Two faults, each inside a scaling step: 2 -> 3 with an old shard SIGKILLed while the third joins, then
    3 -> 2 with the controller SIGKILLed while the scale-in is pending. Greedy streams run throughout and every
    answer equals the single-process engine's (Load checks each one)."""
    from elasticmoe.local_cluster import shard_pids

    controller = handle("Controller", "elastic")
    _scaled(controller, 2)
    load = Load("elastic", apps, PROMPTS, MAX_TOKENS, n=3)
    try:
        time.sleep(2)
        victim = min(shard_pids("elastic", 2).values())
        controller.set_target_shards.remote(3).result()
        load.wait_mid()  # the kill below lands mid-stream, not between the lock-step requests
        joining = controller.status.remote().result()
        load.wait_mid()  # again: the status call can outlast a stream's second half on a loaded machine
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        assert sum(1 for x in joining["shards"] if x["ready"]) < 3, "the third shard had joined before the kill"
        _scaled(controller, 3)
        pid = controller.info.remote().result()["pid"]
        assert controller.set_target_shards.remote(2).result() == 2
        load.wait_mid()  # the kill below lands mid-stream, not between the lock-step requests
        pending = controller.status.remote().result()
        load.wait_mid()
        os.kill(pid, signal.SIGKILL)
        crashed = time.time()
        assert pending["num_shards"] == 3, "the scale-in had finished before the controller was killed"
        after = _scaled(controller, 2)
        assert controller.info.remote().result()["pid"] != pid and after["event_counts"].get("recovered") == 1
        time.sleep(2)
    finally:
        load.finish()  # every stream ended with the reference's tokens
    for t in (killed, crashed):
        assert any(a < t < b for a, b, _ in load.done), f"no stream was mid-way at {t}"
