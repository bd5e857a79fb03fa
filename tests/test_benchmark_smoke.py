"""benchmarks/ without Ray: transport and rpc_fanout run at toy sizes, the helpers of the others checked, every
script imports (the one-process toy runs: test_benchmark_toy_runs.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.bench_util import snippet
from tests.moe_cases import REPO


MODES = ("socket", "unary", "stream", "stream-default", "frames", "frames-thread")  # transport.py's


def _run(script: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *args], cwd=REPO / "benchmarks", env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_decode_timing_refuses_a_timing_lost_in_noise():
    """offline.py's and real_width.py's tokens/s: a full run no slower than a one-token run (noise on a loaded
    machine) stops the benchmark with the fix to try, instead of writing a negative or infinite tokens/s."""
    code = ("from decode_timing import decode_tok_s\n"
            "assert decode_tok_s(2, 5, 0.5, 0.1) == 2 * 4 / 0.4\n"
            "decode_tok_s(1, 4, 0.010, 0.012)\n")
    proc = snippet(code)
    assert proc.returncode == 1 and "timing noise exceeds the decode time" in proc.stderr, proc.stderr[-2000:]


def test_balance_relative_tokens_s_is_the_step_time_over_layers():
    """A step runs its layers one after another, each as long as its busiest shard: a balanced light layer (1, 1)
    and a lopsided heavy one (10, 0) give 6 / 11 of a perfect split, not the mean of the per-layer ratios (0.75)."""
    code = ("import numpy as np\n"
            "from balance import relative_tokens_s\n"
            "print(relative_tokens_s(np.array([[1.0, 1.0], [10.0, 0.0]])), relative_tokens_s(np.zeros((2, 2))))\n")
    proc = snippet(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rel, idle = map(float, proc.stdout.split())
    assert rel == pytest.approx(6 / 11) and idle == 1.0, proc.stdout


STALLS_FAKES = """
import json, time
import elasticmoe.client
calls = []


class FakeClient:  # request 1 fails after 2 tokens; 2 waits 0.3 s (a restart) before its first; 3 as long (a prefill)
    def __init__(self, target, app):
        pass

    def stream(self, prompt, **kw):
        calls.append(time.time())
        if len(calls) > 1:
            time.sleep(0.3)
        yield 1
        time.sleep(0.05)
        yield 2
        if len(calls) == 1:
            raise RuntimeError("UNAVAILABLE")


elasticmoe.client.GenerationClient = FakeClient
import stalls

s = stalls.Streams("x", n=1)
while len(calls) < 3:
    time.sleep(0.01)
s.close()
gaps = sorted(s.gaps(0, time.time()))


class FakeStreams:  # fault()'s windows, asked of the streams
    asked = []

    def __init__(self, app):
        pass

    def gaps(self, t0, t1):
        FakeStreams.asked.append((t0, t1))
        return [0.01]

    def failed(self, t0, t1):
        return 0

    def close(self):
        pass


stalls.settled, stalls.Streams = lambda app: None, FakeStreams
t0 = time.time()
row = stalls.fault("live rebalance", "stall", lambda started: started + 0.5, window_s=0.2)
events = [{"event": "placement", "t": 5.0}, {"event": "grow", "t": 12.0}, {"event": "placement", "t": 13.0}]
print(json.dumps({"gaps": gaps, "failed": len(s.failures), "window": FakeStreams.asked[-1], "t0": t0,
                  "placement": [stalls.placement_time(events, 10.0), stalls.placement_time(events, 14.0)]}))
"""


def test_stalls_gaps_span_a_failed_streams_retry_and_the_window_the_rebalance():
    """stalls.py: a stream that fails and is retried has a gap from its last token to the retry's first (the
    restart it waited for; the gateway-kill row's 'longest gap includes the gateway's restart'), while a finished
    request's successor starts no gap; the rebalance row's window is around the placement event (found in the
    controller's event log from the streams' start), not the moment the wait for it began."""
    proc = subprocess.run([sys.executable, "-c", STALLS_FAKES], cwd=REPO / "benchmarks", capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["failed"] == 1 and len(r["gaps"]) >= 4, r  # 3 in-stream gaps (0.05 s) + the one across the retry
    assert r["gaps"][-1] >= 0.45 and r["gaps"][-2] < 0.2, r  # 0.2 s retry pause + 0.3 s restart; no 0.3 s prefill
    start, end = r["window"]
    assert start == pytest.approx(r["t0"] + 0.5 - 1, abs=0.1) and end - start == pytest.approx(1.2), r
    assert r["placement"] == [13.0, None], r


def test_serving_served_row_refuses_a_failed_client():
    """serving.py's served rows: a client thread whose stream fails raised in its thread only, and the row was
    computed from the other clients' tokens over the same wall time (a lower tok/s, no error); now the row fails."""
    code = ("import elasticmoe.client\n"
            "class Fake:\n"
            "    def __init__(self, address, app):\n"
            "        pass\n"
            "    def stream(self, prompt, **kw):\n"
            "        if prompt.startswith(serving.PROMPT + ' 1 '):\n"
            "            raise ConnectionError('refused')\n"
            "        yield type('Msg', (), {'token_ids': [1, 2]})()\n"
            "elasticmoe.client.GenerationClient = Fake\n"
            "import serving\n"
            "assert serving.bench_served(1, 2, 1, 'port')['tok_s'] > 0\n"
            "try:\n"
            "    serving.bench_served(2, 2, 1, 'port')\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e, '/', repr(e.__cause__))\n")
    proc = snippet(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: served-port" in proc.stdout and "1 of 2 clients failed" in proc.stdout, proc.stdout
    assert "ConnectionError('refused')" in proc.stdout, proc.stdout


def test_direct_cluster_refuses_a_shard_that_dies_before_serving():
    """benchmarks/direct.py: a shard process that died before sending its port left recv waiting forever on the
    write end the parent still held (serving.py hung); now DirectCluster raises, and stops the shards it started.
    The cached tiny:mixtral (no checkpoint made, no transformers modeling imported: the refusal comes first)."""
    from elasticmoe.model.embedded import ensure_tiny_model

    ensure_tiny_model("mixtral")  # in the cache (made here if absent)
    code = ("from direct import DirectCluster\n"
            "try:\n"
            "    DirectCluster('tiny:mixtral', 1, 'socket', device='no-such-device')\n"
            "except RuntimeError as e:\n"
            "    print('refused:', e)\n")
    proc = snippet(code, 180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: expert shard 0 exited before it served" in proc.stdout, (proc.stdout, proc.stderr[-2000:])


def test_overload_capacity_counts_the_time_its_requests_took():
    """overload.py's capacity: the closed loop's clients finish the requests they began before the end, so done over
    the loop's nominal seconds overstated it (2 clients of 0.3 s requests for 1 s: 8 done by 1.2 s, not 8/s)."""
    code = ("import asyncio, time\n"
            "import overload\n"
            "async def one(stub, run, i):\n"
            "    await asyncio.sleep(0.3)\n"
            "    run.done += 1\n"
            "overload.one = one\n"
            "run = asyncio.run(overload.closed_loop('127.0.0.1:9', 1.0, 2))\n"
            "print(run.done, run.seconds)\n")
    proc = snippet(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done, seconds = proc.stdout.split()
    assert int(done) == 8 and 1.15 < float(seconds) < 1.6, proc.stdout


def test_every_benchmark_imports():
    """Each script's module-level imports resolve (the Ray-based ones, stalls.py and overload.py, and real_width.py
    have no run here: this at least catches a moved or renamed dependency). Imported, not run: main() is guarded."""
    names = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    code = ("import importlib\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print('imported')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO / "benchmarks", capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "benchmarks"),
                                                                                         str(REPO)])})
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]
    assert {"stalls", "overload", "real_width", "serving", "transport"} <= set(names), names


def test_transport_benchmark_smoke(tmp_path):
    """A few calls per mode at 16 KiB to 1 and 2 shards, then the mTLS cost at 16 KiB: real echo processes over real
    sockets, gRPC and TLS. Checks that each mode timed its calls and that the ratios and targets were derived from
    them."""
    shards_json, mtls_json = tmp_path / "t.json", tmp_path / "tm.json"
    _run("transport.py", "--scale", "0.03", "--sizes", "16 KiB", "--shards", "1,2", "--json", str(shards_json),
         "--mtls-sizes", "16 KiB", "--mtls-json", str(mtls_json), timeout_s=600)
    report = json.loads(shards_json.read_text())
    assert set(report["cases"]) == {"16 KiB x 1", "16 KiB x 2"}, report["cases"].keys()
    for name, case in report["cases"].items():
        assert case["payload_bytes"] == 16384 and case["calls"] > 0, (name, case)
        for mode in MODES:
            assert 0 < case[mode]["p50_us"] <= case[mode]["p99_us"], (name, mode, case[mode])
        ratio = case["frames"]["p50_us"] / case["socket"]["p50_us"]
        assert abs(case["frames_vs_socket_p50"] - ratio) < 1e-9, (name, case)
        assert report["targets"][f"{name} frames"]["met"] == (ratio <= 2.0), report["targets"]
    mtls = json.loads(mtls_json.read_text())
    assert set(mtls["cases"]) == {"16 KiB"}, mtls["cases"].keys()
    assert {"frames", "frames-mtls", "stream", "stream-mtls", "unary", "unary-mtls"} <= set(mtls["cases"]["16 KiB"])
    assert mtls["new_connection"], mtls


def test_transport_unix_benchmark_smoke(tmp_path):
    """A few calls per mode at 16 KiB to 1 and 2 shards: the TCP and Unix socket floors and the socket transport over
    each (the script itself asserts each transport went over its family), every ratio derived from the timings."""
    out = tmp_path / "u.json"
    _run("transport_unix.py", "--scale", "0.03", "--sizes", "16 KiB", "--shards", "1,2", "--json", str(out))
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"16 KiB x 1", "16 KiB x 2"}, report["cases"].keys()
    for name, case in report["cases"].items():
        for mode in ("socket", "socket-unix", "frames-tcp", "frames-unix"):
            assert 0 < case[mode]["p50_us"] <= case[mode]["p99_us"], (name, mode, case[mode])
        assert case["frames-unix_vs_floor_p50"] == case["frames-unix"]["p50_us"] / case["socket-unix"]["p50_us"]
        assert case["unix_vs_tcp_p50"] == case["frames-unix"]["p50_us"] / case["frames-tcp"]["p50_us"]


def test_transport_ladder_benchmark_smoke(tmp_path):
    """A few calls per rung at 16 KiB to one echo shard (the script itself checks the echo's bytes): every rung timed,
    every ratio derived from the timings."""
    out = tmp_path / "l.json"
    _run("transport_ladder.py", "--scale", "0.01", "--sizes", "16 KiB", "--json", str(out))
    case = json.loads(out.read_text())["cases"]["16 KiB"]
    assert case["payload_bytes"] == 16384 and case["calls"] >= 20, case
    assert 0 < case["socket"]["p50_us"] <= case["socket"]["p99_us"], case["socket"]
    for rung in ("frames-raw", "frames-codec", "frames-future", "transport"):
        assert 0 < case[rung]["p50_us"] <= case[rung]["p99_us"], (rung, case[rung])
        assert case[f"{rung}_vs_socket_p50"] == case[rung]["p50_us"] / case["socket"]["p50_us"], rung


REFUSALS = """
import contextlib, io, json, sys
import transport

out = {}
for flag in ("--sizes", "--mtls-sizes"):  # one process, one import of transport.py (torch, grpc) for both
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            transport.main([flag, "16 KiB,3 KiB"])
        code = 0
    except SystemExit as e:
        code = e.code
    out[flag] = [code, err.getvalue()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def transport_refusals() -> dict:
    """flag -> [exit code, stderr] of transport.py's main with an unknown size for it."""
    proc = snippet(REFUSALS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flag", ["--sizes", "--mtls-sizes"])
def test_transport_refuses_an_unknown_size_before_starting_anything(flag, transport_refusals):
    """An unknown size name is an argparse error naming the flag and the choices (it was a KeyError traceback after
    every echo process had started)."""
    code, stderr = transport_refusals[flag]
    assert code == 2 and f"{flag}: unknown ['3 KiB']; choose from 16 KiB" in stderr, (code, stderr)


def test_rpc_fanout_microbenchmark_smoke(tmp_path):
    """`benchmarks/rpc_fanout.py` (the codec and the fan-out strategies, over spawned echo shards): each strategy
    timed its calls at 1 and 2 shards."""
    out = tmp_path / "rf.json"
    _run("rpc_fanout.py", "--calls", "5", "--warmup", "2", "--servers", "1", "2", "--kib", "8", "--json", str(out))
    report = json.loads(out.read_text())
    machine = report.pop("machine")
    assert machine["cpu"] and machine["cpus"] > 0, machine
    assert set(report) == {"codec", "8 KiB x 1 shard(s)", "8 KiB x 2 shard(s)"}, report.keys()
    for name, rows in report.items():
        assert rows and all(0 < r["p50_us"] <= r["p99_us"] for r in rows.values()), (name, rows)
    for name in ("8 KiB x 1 shard(s)", "8 KiB x 2 shard(s)"):  # CPU per fan-out, the in-loop reference's too
        assert all(r["cpu_us"] > 0 for r in report[name].values()), report[name]


def test_shard_call_benchmark_smoke():
    """`benchmarks/shard_call.py` (one shard's per-call path, in process) at a toy size: the replies' hash, then the
    call's, the kernel's and the rest's CPU time per call, and each stage's."""
    out = _run("shard_call.py", "--layers", "2", "--hidden", "64", "--intermediate", "64", "--calls", "20").stdout
    head, stages = out.strip().splitlines()[-2:]
    assert head.startswith("replies ") and "us/call p10 / p50: call" in head, out
    assert stages.startswith("stages p50 us: decode_frame"), out
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", head + stages)]
    assert len(numbers) == 12 and all(x >= 0 for x in numbers) and numbers[0] > 0, out
