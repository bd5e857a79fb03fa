"""Every single fault, injected into a real local Ray cluster while greedy streams run, compared token by token with
the single-process engine: shard SIGKILL with and without replicas, controller SIGKILL and SIGSTOP, shard SIGSTOP,
gateway SIGKILL and a paused unreplicated shard (a failed LoadExperts during a rebalance: test_elastic_e2e)."""

from __future__ import annotations

import inspect
import os
import signal
import threading
import time

import grpc
import numpy as np
import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.local_cluster import shard_pids, sole_holder
from tests.serving_util import GRPC, Load, app_entry, deploy, handle

pytestmark = pytest.mark.e2e
PROMPTS = [f"Stream {i} asks the experts about {w}" for i, w in
           enumerate(["fish", "the sea", "mountains", "rivers", "a king", "stars"])]
MAX_TOKENS = 40
DIRECT_PORT = 9102  # app "one"'s direct_grpc port
DIRECT = f"127.0.0.1:{DIRECT_PORT}"
HEDGE_MIN_S = inspect.signature(GrpcDispatcher).parameters["hedge_min_s"].default  # the floor of the hedge delay


@pytest.fixture(scope="module")
def apps(ray_cluster, tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("faults")
    plain = make_tiny_model("mixtral", tmp / "plain", layers=2, experts=8)
    deploy(ray_cluster, [app_entry("rep", plain, 2, expert_copies=2),
                         app_entry("one", plain, 2, direct_grpc={"port": DIRECT_PORT})], tmp / "faults.yaml")
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    ref = dict(zip(PROMPTS, (o.token_ids for o in LLM(str(plain)).generate(PROMPTS, sp))))
    return {"rep": ref, "one": ref}


class Streams:
    """Greedy streams of PROMPTS[:n] through gRPC, each token's arrival time recorded; errors kept, not raised."""

    def __init__(self, app: str, n: int = 6):
        self.app, self.tokens, self.times, self.errors = app, {}, {}, {}
        self.threads = [threading.Thread(target=self._run, args=(p,), daemon=True) for p in PROMPTS[:n]]
        for t in self.threads:
            t.start()

    def _run(self, prompt: str) -> None:
        self.tokens[prompt], self.times[prompt] = [], []
        try:
            for r in GenerationClient(GRPC, app=self.app).stream(prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                                                   ignore_eos=True):
                self.tokens[prompt] += r.token_ids
                self.times[prompt] += [time.time()] * len(r.token_ids)
        except Exception as e:  # noqa: BLE001 - a failed stream is what the tests count
            self.errors[prompt] = repr(e)

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        """Until every stream has at least n tokens (so a fault that follows lands mid-stream)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.times) == len(self.threads) and all(len(t) >= n for t in self.times.values()):
                return
            time.sleep(0.02)
        raise AssertionError(f"streams did not start: {self.errors}")

    def join(self, timeout: float = 300) -> None:
        for t in self.threads:
            t.join(timeout=timeout)

    def check(self, reference: dict, fault_at: float) -> float:
        """0 failed streams, exact tokens, the fault landed mid-stream; returns the longest token gap (s)."""
        assert not self.errors, self.errors
        for p, toks in self.tokens.items():
            assert toks == reference[p], f"{p!r} diverged"
            assert self.times[p][0] < fault_at < self.times[p][-1], "the fault did not land mid-stream"
        return max(float(np.diff(t).max()) for t in self.times.values())


def _shard_pids(app: str, n: int = 2) -> list[int]:
    handle("ExpertShard", app)  # connects this driver
    pids = sorted(shard_pids(app, n).values())
    assert len(pids) >= n, f"found only {pids}"
    return pids


def _status(app: str) -> dict:
    return handle("Controller", app).status.remote().result(timeout_s=60)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - a restarting deployment
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _settled(app: str, shards: int = 2) -> dict:
    """Wait until `app` has `shards` live shards and a complete placement; "rep" also every expert on >= 2 shards
    again (a replicated fault test then injects into a truly replicated placement)."""
    copies = 2 if app == "rep" else 1
    return _wait(lambda: (s := _status(app))["complete"] and not s["recovering"]
                 and sum(1 for x in s["shards"] if x["ready"] and x["healthy"]) == shards
                 and s["num_shards"] == shards and min(min(row) for row in s["copies"]) >= copies and s, 240,
                 f"{app}: {shards} live shards, complete placement, >= {copies} copies of every expert")


def _step_log(app: str, t0: float, t1: float) -> list[tuple[float, float, int]]:
    """The gateway's (end time, seconds, calls hedged) of each engine step that ended between t0 and t1."""
    return [x for x in handle("Gateway", app).step_times.remote(t0).result() if x[0] <= t1]


def _steps(app: str, t0: float, t1: float) -> list[float]:
    return [s for _, s, _ in _step_log(app, t0, t1)]


def _mid_stream(app: str, reference: dict, inject, after_tokens: int = 8) -> tuple[Streams, float, float]:
    """Greedy streams on `app`; once each has `after_tokens` tokens, `inject()`. Every stream must end exact, none
    failed, with the fault landed mid-stream. Returns (the streams, when the fault began, the longest token gap)."""
    streams = Streams(app)
    streams.wait_tokens(after_tokens)
    at = time.time()
    inject()
    streams.join()
    return streams, at, streams.check(reference, at)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _pause(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    os.kill(pid, signal.SIGCONT)


def _least_suspected(app: str, pids: dict[str, int]) -> int:
    """pid of the shard the gateway last got around (failed over or hedged from) longest ago. A shard got around
    is avoided for suspect_s while another copy exists: a kill there may land on no call (CI: a hedge on a loaded
    host 0.1 s before the kill, then nothing sent to the victim, no fault to see)."""
    log = handle("Gateway", app).stats.remote().result()["fault_log"]
    last = {s: max((f["at"] for f in log if s in f["dead"] + f["straggled"]), default=0.0) for s in pids}
    return pids[min(last, key=last.get)]


def test_replicated_shard_kill_fails_over_inside_the_step(apps):
    _settled("rep")
    pids = shard_pids("rep", 2)
    assert len(pids) == 2, pids
    streams, killed, gap = _mid_stream("rep", apps["rep"], lambda: _kill(_least_suspected("rep", pids)))
    start = min(t[0] for t in streams.times.values())
    before = _steps("rep", start, killed)
    median = float(np.median(before))
    stats = handle("Gateway", "rep").stats.remote().result()
    # Steps that got around the victim: a call to it failed and went to the other copy ("dead"), or it straggled and
    # was hedged there before its failure was seen ("straggled": the kernel tears a killed replica's sockets down
    # in ~70 ms or more on loaded cores, the hedge goes at >= 0.1 s), whichever came first in that step.
    faults = [f for f in stats["fault_log"] if f["at"] >= killed]
    assert faults, f"no step got around the victim: the kill did not land in a step ({stats['failovers']} " \
                   f"failovers, {stats['hedges']} hedges, fault log {stats['fault_log'][-5:]})"
    log = handle("Gateway", "rep").step_times.remote(killed).result()  # (end, seconds, hedges) per step
    hit = [s for end, s, _ in log if any(end - s - 0.005 <= f["at"] <= end + 0.005 for f in faults)]
    assert hit, (faults, log[:10])
    # The failover happened inside the step: once the failure was seen, re-sending to the other copy cost a few
    # round trips at most, far from what waiting would cost (the 5 s call deadline, or the controller noticing the
    # death and publishing a re-homed table: seconds). A round trip here shares the 2 cores with Serve starting the
    # replacement replica (68 ms seen once against a 47 ms median step), hence 3x the median or 0.25 s. Seeing
    # the failure is the OS's part: a SIGKILLed process's sockets close only once the kernel has torn it down
    # (failures seen 70 ms into the call in our runs), so the step that failed over is held to 3x the median plus
    # that detection time (same floor). The token gap bounds the other steps of those seconds.
    for f in faults:
        assert f["done_s"] - f["detected_s"] <= max(3 * median, 0.25), (f, median)
    detect = max(f["detected_s"] for f in faults)
    assert max(hit) <= max(3 * median, 0.25) + detect, (
        f"a step that failed over took {max(hit) * 1e3:.0f} ms, median {median * 1e3:.0f} ms; "
        f"failed-over calls {faults}")
    assert gap < 1.0, f"longest token gap {gap:.2f} s"
    _settled("rep")


def test_unreplicated_shard_kill_loses_nothing(apps):
    _settled("one")
    victim = sole_holder("one")
    _mid_stream("one", apps["one"], lambda: _kill(victim))
    _settled("one")


def test_controller_kill_loses_nothing_and_it_resumes(apps):
    before = _settled("rep")
    pid = handle("Controller", "rep").info.remote().result()["pid"]
    _, _, gap = _mid_stream("rep", apps["rep"], lambda: _kill(pid))
    assert gap < 1.0, f"longest token gap {gap:.2f} s"
    after = _settled("rep")
    assert handle("Controller", "rep").info.remote().result()["pid"] != pid
    assert {s["id"] for s in after["shards"]} == {s["id"] for s in before["shards"]}
    assert after["version"] > before["version"] and after["event_counts"].get("recovered") == 1
    # and a shard kill after the restart still loses nothing
    _mid_stream("rep", apps["rep"], lambda: _kill(_shard_pids("rep")[0]))
    _settled("rep")


def test_controller_paused_20s_loses_nothing_and_the_gateway_polls_again(apps):
    """The controller stopped (SIGSTOP) for 20 s, longer than a gateway's table call may take (11 s), shorter than
    Serve's health check allows (30 s): the gateway keeps serving on its last table (requests complete during the
    pause, every token exact, none failed), its timed-out polls are dropped, and once the controller runs again the
    same replica (not a restart) hears from the gateway within seconds (a fresh acknowledgement of its version)."""
    before = _settled("rep")
    ctrl = handle("Controller", "rep")
    pid = ctrl.info.remote().result()["pid"]
    load = Load("rep", apps["rep"], PROMPTS, MAX_TOKENS)
    time.sleep(2)
    stopped = time.time()
    _pause(pid, 20)
    resumed = time.time()
    acked = _wait(lambda: (g := _status("rep")["gateways"]) and set(g.values()) == {before["version"]} and g, 15,
                  "the gateway's poll acknowledging the current version after the pause")
    load.finish()  # no request failed or diverged
    during = [b for a, b, _ in load.done if stopped + 1 < a and b < resumed - 1]
    assert len(during) >= 10, f"only {len(during)} requests ran within the pause"
    assert ctrl.info.remote().result()["pid"] == pid and acked
    assert _settled("rep")["version"] == before["version"]


def _replica_ids(app: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name.rsplit("#", 1)[-1] for a in actors if a.name and f"#{app}#ExpertShard#" in f"#{a.name}"}


def test_paused_shard_then_another_killed_no_zombie(apps):
    _settled("one")
    paused = sole_holder("one")
    (other,) = set(_shard_pids("one")) - {paused}
    _mid_stream("one", apps["one"], lambda: _pause(paused, 8), after_tokens=4)
    _settled("one")  # the paused one was dropped, failed its health check, and a new replica took its place
    _mid_stream("one", apps["one"], lambda: _kill(other if other in _shard_pids("one") else _shard_pids("one")[0]),
                after_tokens=4)
    _settled("one")
    assert _wait(lambda: _replica_ids("one") <= {s["id"] for s in _settled("one")["shards"]}, 120,
                 "every ExpertShard replica in the placement or gone")


def test_paused_shard_with_a_replica_is_hedged(apps):
    """The README's claim: a long pause costs one hedge delay, not one per step (nor one per suspicion period). Read
    from the gateway's own step times, which the client side's scheduling noise on a 2-core machine does not reach;
    the users' side: the requests that ran through the pause kept their pace (median TPOT) and none waited it out."""
    _settled("rep")
    load = Load("rep", apps["rep"], PROMPTS, MAX_TOKENS)
    time.sleep(3)
    hedges0 = handle("Gateway", "rep").stats.remote().result()["hedges"]  # the module's earlier faults hedged too
    paused = _shard_pids("rep")[0]
    stopped = time.time()
    _pause(paused, 8)
    resumed = time.time()
    time.sleep(2)
    load.finish()
    during, before = load.tpot(stopped, resumed), load.tpot(0.0, stopped - 1.0)
    assert len(during) >= 4 and len(before) >= 4, (len(during), len(before))
    stats = handle("Gateway", "rep").stats.remote().result()
    faults = [f for f in stats["fault_log"] if f["at"] >= stopped]
    log = _step_log("rep", stopped, resumed)
    steps = [x for _, x, _ in log]
    hedged = [(round(t - stopped, 2), round(x * 1e3)) for t, x, h in log if h]
    slow = [(round(t - stopped, 2), round(x * 1e3)) for t, x, h in log if x >= HEDGE_MIN_S and not h]
    worst = sorted(((b - a) / (n - 1), a - stopped, b - stopped) for a, b, n in load.done
                   if a <= resumed and b >= stopped and n > 1)[-3:]
    why = (f"hedges {stats['hedges'] - hedges0}, {len(steps)} steps, hedged steps (s after the pause began, ms) "
           f"{hedged[:8]}, unhedged steps of a hedge delay or more {slow[:8]}, fault log "
           f"{[(round(f['at'] - stopped, 2), f['detected_s'], f['done_s']) for f in faults][:8]}, "
           f"slowest requests (TPOT ms, first and last token s after the pause began; it ended at "
           f"{resumed - stopped:.2f}) {[(round(t * 1e3), round(a, 2), round(b, 2)) for t, a, b in worst]}")
    assert stats["hedges"] > hedges0, f"no call was hedged during the pause; {why}"
    # The claim, counted by the gateway itself: the steps that waited a hedge delay are the ones that hedged (one, or
    # two with micro-batches in flight), not one per step. A step slowed by the 2-core machine's scheduling alone
    # (the in-process suite runs beside this one in CI: 7 of 644 steps took 0.11-0.25 s there) hedged nothing; it is
    # in the message, and a step that waited on the paused shard without hedging is bounded by the next assertion.
    assert len(steps) >= 100 and 1 <= len(hedged) <= 2, f"{len(hedged)} steps hedged; {why}"
    assert max(steps) < 1.0, f"a step waited on the paused shard; {why}"
    assert max(t for t, _, _ in worst) * (MAX_TOKENS - 1) < 4.0, f"a request waited out the pause; {why}"
    median, base = float(np.median(during)), float(np.median(before))
    assert median < 2 * base, f"median TPOT {median * 1e3:.1f} ms during the pause, {base * 1e3:.1f} before; {why}"
    _settled("rep")


def test_unreplicated_shard_paused_30s_its_requests_complete(apps):
    _settled("one")
    paused = sole_holder("one")
    _mid_stream("one", apps["one"], lambda: _pause(paused, 30), after_tokens=4)
    _settled("one")


def test_gateway_kill_gives_unavailable_fast_and_a_retry_succeeds(apps):
    """A stream through Serve's proxy and one on the gateway's direct_grpc port are running when the gateway replica
    is SIGKILLed: both end UNAVAILABLE within seconds (the clients told not to resume them); Serve's replacement
    answers both ways again, exactly."""
    _settled("one")
    pid = handle("Gateway", "one").stats.remote().result()["pid"]
    client = GenerationClient(GRPC, app="one", resume_backoff_s=())
    direct = GenerationClient(DIRECT, resume_backoff_s=())
    its = [c.stream(PROMPTS[0], max_tokens=200, temperature=0.0, ignore_eos=True) for c in (client, direct)]
    for it in its:
        next(it)
    killed = time.monotonic()
    _kill(pid)
    for it in its:
        with pytest.raises(grpc.RpcError) as err:
            for _ in it:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert time.monotonic() - killed < 20.0  # promptly: a stream left hanging would wait for its 300 s deadline
    for c in (client, direct):
        got = _wait(lambda: list(c.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0,
                                            ignore_eos=True).token_ids), 180, "a retry to succeed")
        assert got == apps["one"][PROMPTS[0]]


def test_gateway_kill_mid_stream_the_client_resumes_exactly(apps):
    """A stream through Serve's proxy and one on the direct_grpc port are running when the gateway replica is
    SIGKILLed: GenerationClient.stream resumes each (GenerateRequest.resume) once a replica answers again, and their
    messages join to the unbroken greedy answer: tokens, text, finish reason and usage."""
    _settled("one")
    pid = handle("Gateway", "one").stats.remote().result()["pid"]
    patient = dict(timeout_s=600, resume_backoff_s=(1.0,) * 240)  # the replacement's start may take a while
    clients = [GenerationClient(GRPC, app="one", **patient), GenerationClient(DIRECT, **patient)]
    kw = dict(max_tokens=200, temperature=0.0, ignore_eos=True)
    streams = [c.stream(PROMPTS[1], **kw) for c in clients]
    chunks = [[next(it)] for it in streams]  # each stream under way before the kill
    _kill(pid)
    for it, got in zip(streams, chunks):
        got += list(it)
        assert it.resumes >= 1, "the kill did not break the stream"
        assert got[0].finish_reason == 0 and got[-1].finish_reason == 1  # UNSPECIFIED first, LENGTH at the end
        assert got[-1].usage.completion_tokens == 200
    [want] = _wait(lambda: [clients[1].generate(PROMPTS[1], **kw)], 180, "the replacement to answer")
    for got in chunks:
        assert [t for c in got for t in c.token_ids] == list(want.token_ids)
        assert "".join(c.text for c in got) == want.text
