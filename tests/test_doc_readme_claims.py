"""The README's statements about the demo, the fan-out and the fault handling that name a number or a printed line,
or a fault behaviour no other test holds: each is checked against the code that makes it so (tests/test_doc_claims.py:
names, commands and defaults)."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from tests.controller_util import model  # noqa: F401 - a fixture
from tests.doc_util import REPO

README = " ".join((REPO / "README.md").read_text().split())


def _demo_block() -> list[str]:
    return re.search(r"```\n(\[1/4\].*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1).splitlines()


def test_the_demo_model_is_the_one_described():
    """"a 2-layer, 8-expert, top-2 Mixtral (1.9 MB) that it trains on first use (300 Adam steps ...)", cached as
    demo-mixtral-<recipe hash> (the name the demo's output shows)."""
    import torch
    from transformers import MixtralForCausalLM

    from elasticmoe.model.demo import DemoArgs, demo_config, make_tokenizer
    from elasticmoe.model.embedded import demo_model_dir

    assert "a 2-layer, 8-expert, top-2 Mixtral (1.9 MB) that it trains on first use (300 Adam steps" in README
    a = DemoArgs()
    assert (a.layers, a.experts, a.top_k, a.steps) == (2, 8, 2, 300)
    with torch.device("meta"):
        model = MixtralForCausalLM(demo_config(a, make_tokenizer(a.vocab)))
    assert round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 1) == 1.9  # float32 safetensors
    shown = re.search(r"\.cache/elasticmoe/(demo-mixtral-\w+)", _demo_block()[0]).group(1)
    assert demo_model_dir().name == shown


def test_the_demo_completions_are_the_offline_greedy_ones():
    """"The completions are the in-process `LLM`'s greedy tokens": the README's four, 24 tokens each."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.model.demo import DEMO_PROMPTS

    answers = {p: (t, n) for p, t, n in re.findall(r"^  ('.*?') -> ('.*?')  \((\d+) tokens", "\n".join(_demo_block()),
                                                   flags=re.M)}
    assert len(answers) == 4
    outs = LLM("tiny:demo").generate(list(DEMO_PROMPTS), SamplingParams(max_tokens=24, temperature=0.0))
    assert {repr(p): (repr(o.text), str(len(o.token_ids))) for p, o in zip(DEMO_PROMPTS, outs)} == answers


def test_fan_out_and_fault_numbers():
    """"else to that shard again 50 ms later"; a frame listener open at exit lets its frame finish "(up to 5 s)"; a
    replica Serve stops gives the calls in flight "up to 2 s";
    micro-batches need "at least 8 tokens from two or more sequences in a step"; a prefill chunk out of memory is
    halved "down to 16 tokens" and the step budget "held for 30 s at the largest run that fit"."""
    import inspect

    from elasticmoe.engine.engine import Engine
    from elasticmoe.engine.step_forward import BUDGET_HOLD_S, MIN_PIECE_TOKENS
    from elasticmoe.experts.deployment import STOP_GRACE_S
    from elasticmoe.gateway.failover import BUSY_RETRY_S
    from elasticmoe.model.pipeline import micro_batch_count
    from elasticmoe.rpc.frame_listener import EXIT_WAIT_S

    assert "else to that shard again 50 ms later" in README and BUSY_RETRY_S == 0.05
    assert "lets that frame finish (up to 5 s)" in README and EXIT_WAIT_S == 5.0
    assert "the calls in flight get up to 2 s to be answered" in README and STOP_GRACE_S == 2.0
    # the three: tests/test_runner_health.py counts the steps that raised before the requests ended and the check fails
    assert "a gateway whose engine steps raised three times in a row with none succeeding since" in README
    assert "at least 8 tokens from two or more sequences in a step" in README
    least = inspect.signature(Engine).parameters["pipeline_min_tokens"].default
    assert least == 8
    assert [micro_batch_count(t, s, 2, least) for t, s in [(7, 7), (8, 1), (8, 2), (64, 2)]] == [1, 1, 2, 2]
    assert "(halved again while it fails, down to 16 tokens)" in README and MIN_PIECE_TOKENS == 16
    assert "whose 16-token piece does not fit ends" in README
    assert "is held for 30 s at the largest run that" in README and BUDGET_HOLD_S == 30.0


def test_slow_readers_keepalive_and_reconnect_numbers():
    """"up to 32 frames or 256 MiB; one more is refused as busy", "moves nothing for 10 s", "30 s idle, 3 probes
    10 s apart", "within 1 s": the constants behind them (tests/test_socket_spill.py, test_frame_listener.py and
    test_socket_transport.py test the behaviour)."""
    from elasticmoe.gateway.socket_conn import SPILL_BYTES, SPILL_FRAMES
    from elasticmoe.gateway.transport import RECONNECT_OPTIONS
    from elasticmoe.rpc import frame_socket as fs

    text = " ".join(README.split())
    assert "queued behind (up to 32 frames or 256 MiB; one more is refused as busy)" in text
    assert SPILL_FRAMES == 32 and SPILL_BYTES == 256 << 20
    assert "a writer that moves nothing for 10 s ends the connection" in text and fs.SEND_TIMEOUT_S == 10
    assert "(30 s idle, 3 probes 10 s apart)" in text
    assert (fs.KEEPALIVE_IDLE_S, fs.KEEPALIVE_COUNT, fs.KEEPALIVE_INTERVAL_S) == (30, 3, 10)
    assert "reached again within 1 s" in text and dict(RECONNECT_OPTIONS)["grpc.max_reconnect_backoff_ms"] == 1000


def test_controller_calls_and_placement_calls_numbers():
    """"a gateway's table call that outlasts 11 s is cancelled" (the poll's hold plus a call's answer;
    tests/test_table_epochs.py cancels them), "at most 4 `LoadExperts` / `DropExperts` run or wait at once"
    (tests/test_shard_placement_calls.py refuses the fifth)."""
    from elasticmoe.experts.placement_calls import PLACEMENT_CALLS
    from elasticmoe.gateway.deployment import CALL_TIMEOUT_S, TABLE_WAIT_S

    assert "a gateway's table call that outlasts 11 s is cancelled" in README
    assert CALL_TIMEOUT_S + TABLE_WAIT_S == 11.0
    assert "at most 4 `LoadExperts` / `DropExperts` run or wait at once" in README and PLACEMENT_CALLS == 4


def test_the_controller_reads_the_shards_counters_once_a_second():
    """"The controller reads every live shard's counters once a second": its stats loop's interval."""
    from elasticmoe.autoscaler.controller import STATS_INTERVAL_S

    assert "The controller reads every live shard's counters once a second" in README and STATS_INTERVAL_S == 1.0


def test_a_shard_the_controller_dropped_fails_its_health_check(model):  # noqa: F811
    """"a shard that finds itself dropped fails its Serve health check and is replaced": the replica's own heartbeats,
    answered by a real controller that has dropped it from the placement, make its check_health raise (Serve then
    replaces it); before the drop the check passes."""
    from tests.controller_util import ControllerImpl, _args, _LoopHandle, _until, _with_shards
    from tests.test_controller_restart import ShardImpl, _Replica

    assert "a shard that finds itself dropped fails its Serve health check and is replaced" in README

    async def scenario(files, a, b):
        ctrl = ControllerImpl(_args(model))
        await a.join(ctrl)
        await b.join(ctrl)
        replica = object.__new__(_Replica)  # b's replica as __init__ and its registration leave it
        replica.shard_id, replica.address, replica.error, replica.desired = "b", b.address, None, 2.0
        replica.controller = _LoopHandle(ctrl, asyncio.get_running_loop())
        replica.registered, replica.stopping, replica.evicted = threading.Event(), False, None
        replica.started = time.monotonic()
        replica.registered.set()
        beats = threading.Thread(target=ShardImpl._heartbeats, args=(replica,), daemon=True)
        beats.start()
        try:
            await asyncio.sleep(1.5)  # beats while the controller knows b
            ShardImpl.check_health(replica)
            await ctrl.drain("b")  # the controller drops b (here asked to; a lost shard goes the same way)
            await _until(lambda: replica.evicted is not None, 10, "b's heartbeat to find it dropped")
            with pytest.raises(RuntimeError, match="dropped this shard"):
                ShardImpl.check_health(replica)
        finally:
            replica.stopping = True
            await asyncio.to_thread(beats.join, 15)
            for task in ctrl._tasks:
                task.cancel()
        assert not beats.is_alive()

    _with_shards(model, "ab", scenario)


def test_a_direct_port_claim_lies_under_tmpdir_per_user(tmp_path, monkeypatch):
    """"each replica holds a claim on the port for its application (a lock under
    `$TMPDIR/elasticmoe-direct-grpc-<uid>/`, ...)": with no directory given (as the gateway replica makes it), the
    lock is there, private to the user, and another application's claim on the port is refused naming the holder
    (tests/test_direct_ingress.py tests the claims in a directory of its own)."""
    import os
    import tempfile

    from elasticmoe.gateway.direct_ingress import PortClaim

    assert "a lock under `$TMPDIR/elasticmoe-direct-grpc-<uid>/`" in README
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
    claim = PortClaim(9199, "one")
    try:
        where = tmp_path / f"elasticmoe-direct-grpc-{os.getuid()}"
        assert claim.dir == where and (where / "9199-one.lock").is_file()
        assert where.stat().st_mode & 0o777 == 0o700
        with pytest.raises(OSError, match="port 9199 is already served by application 'one'"):
            PortClaim(9199, "two")
    finally:
        claim.release()
    PortClaim(9199, "two").release()  # released: the port is free for another application


def _recipes() -> dict[str, str]:
    """Makefile target -> its recipe (the tab-indented lines under it, joined)."""
    out: dict[str, str] = {}
    target = None
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([\w.$()/-]+):", line)
        if m:
            target = m.group(1)
            out[target] = ""
        elif line.startswith("\t") and target:
            out[target] += line.strip() + "\n"
    return out


def test_the_make_targets_do_what_the_readme_says(monkeypatch):
    """Two commands and Development: `make run` is `elasticmoe demo`; `make test` checks the generated gRPC code,
    then runs the e2e tests, the in-process ones and those that mostly wait (tests/wait_bound.py) as three pytest
    processes; `make test-fast` is `-m "not e2e"`;
    `make protos` regenerates; `make stop` is `ray stop`; the CPU torch wheel comes from /opt/wheels;
    `make` sets $ELASTICMOE_CACHE to .cache/elasticmoe, and unset it is ~/.cache/elasticmoe."""
    from pathlib import Path

    from elasticmoe.model.embedded import cache_dir

    make, r = (REPO / "Makefile").read_text(), _recipes()
    assert "make run     # set up .venv" in (REPO / "README.md").read_text()
    for target in ("run", "test", "test-fast", "protos"):  # each sets up .venv first
        assert re.search(r"^%s:\s+setup\b" % re.escape(target), make, flags=re.M), target
    assert re.search(r"^setup: \$\(VENV\)/\.installed$", make, flags=re.M)
    assert r["run"].strip() == "$(BIN)/elasticmoe demo"
    assert r["test"].splitlines()[0] == "$(BIN)/python -m elasticmoe.rpc.generate --check"
    assert '-m "not e2e and not waits"' in r["test"] and '-m "waits and not e2e"' in r["test"]
    assert "-m e2e" in r["test"] and "wait $$unit" in r["test"] and "wait $$waits" in r["test"]
    from tests.wait_bound import WAIT_BOUND  # the third process's modules: each one a test file

    assert WAIT_BOUND and all((REPO / "tests" / f"{m}.py").is_file() for m in WAIT_BOUND)
    assert r["test-fast"].strip() == '$(BIN)/python -m pytest -q -ra -m "not e2e"'
    assert r["protos"].strip() == "$(BIN)/python -m elasticmoe.rpc.generate"
    assert "ray stop" in r["stop"]
    assert "(the CPU torch wheel is taken from `/opt/wheels` when present)" in README
    assert re.search(r"^export PIP_FIND_LINKS \?= /opt/wheels$", make, flags=re.M)
    assert "(`make` sets `.cache/elasticmoe`; unset, `~/.cache/elasticmoe`)" in README
    assert re.search(r"^export ELASTICMOE_CACHE \?= \$\(CURDIR\)/\.cache/elasticmoe$", make, flags=re.M)
    monkeypatch.delenv("ELASTICMOE_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "elasticmoe"
