"""An expert shard whose registration plan does not fit in its memory: the error, naming the plan's experts and bytes
and what memory refused, reaches the controller's status and the replica's health as an unreadable plan's does
(tests/test_shard_plan_errors.py), and the plan is tried again with a backoff; memory freed, a later try loads it and
the shard gets ready. A real replica (ExpertShard's own start, its gRPC server) and a real controller in a process of
their own, whose address space is capped (RLIMIT_AS) once both are up: the layer's storage
(model.expert_weights.storage) is refused by the kernel (ENOMEM), as on a full host. No Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from elasticmoe.model.tiny import make_tiny_model
from tests.capped_shard import MALLOC

H, INTER, E = 64, 32768, 2  # one layer of 2 float32 experts: w13 [2I, H] + w2 [H, I] = 24 MiB each, 48 MiB stacked
ROOM = 24 << 20  # what the capped process may map beyond what it has: its threads and calls, not the layer's storage

SCRIPT = r"""
import asyncio, json, os, resource, sys, threading, time
threading.stack_size(256 << 10)  # threads started once capped map 256 KiB, not 8 MiB
from elasticmoe import status_view
from elasticmoe.autoscaler.record import GcsRecord
from elasticmoe.experts import deployment
from tests.controller_util import ControllerImpl, _args, _LoopHandle

deployment.PLAN_RETRY_S, deployment.PLAN_RETRY_MAX_S = 0.2, 0.8  # the backoff's schedule, shortened
GcsRecord("default").clear()
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
on = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(30)

async def make():
    return ControllerImpl(_args(sys.argv[1], num_shards=1))

ctrl = asyncio.run_coroutine_threadsafe(make(), loop).result(60)
held, release = threading.Event(), threading.Event()

async def hold():  # the replica's registration waits for the controller's lock until the cap is on
    async with ctrl._start():
        held.set()
        await asyncio.to_thread(release.wait, 30)

holding = asyncio.run_coroutine_threadsafe(hold(), loop)
held.wait(30)
replica = type("Shard", (deployment.ExpertShard.func_or_class,), {"__del__": lambda self: None})(
    _args(sys.argv[1], num_shards=1), _LoopHandle(ctrl, loop))
size = int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmSize"].split()[0]) << 10
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[2]), resource.RLIM_INFINITY))
release.set()
holding.result(30)

def report(wait_for):
    deadline = time.monotonic() + 30
    while not wait_for() and time.monotonic() < deadline:
        time.sleep(0.05)
    (entry,) = on(ctrl.status())["shards"]
    try:
        replica.check_health()
        health = None
    except RuntimeError as e:
        health = str(e)
    return {"registered": replica.registered.is_set(), "held": len(replica.store.held()), "entry": entry,
            "status": status_view.health(entry), "load_error": replica.load_error, "tries": replica.plan_failures,
            "health": health}

replica.started -= 601  # Serve's health check, past the start deadline
capped = report(lambda: replica.plan_failures >= 3)
replica.started += 601
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # memory freed
freed = report(replica.registered.is_set)
replica._stop_registering()
replica.server.stop(None).wait(10)
print(json.dumps({"capped": capped, "freed": freed}), flush=True)
os._exit(0)  # the controller's loop and tasks go with the process
"""


def test_a_plan_that_does_not_fit_in_memory_is_reported_backs_off_and_loads_once_memory_is_freed(tmp_path):
    """Before: each try failed with a warning ('registration attempt 7 failed'), up to 600 tries every 2 s; the
    controller showed the shard 'loading', with no error, and Serve's health check said 'not registered with the
    controller' after 600 s."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=1, experts=E, hidden=H, intermediate=INTER)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **MALLOC, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(ROOM)], capture_output=True, text=True,
                         timeout=180, env=env, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    capped, freed = out["capped"], out["freed"]
    plan_bytes = E * 3 * H * INTER * 4
    assert not capped["registered"] and capped["held"] == 0, capped
    assert capped["tries"] >= 3 and capped["status"] == "failed", capped
    error = capped["entry"].get("load_error") or ""
    assert error == capped["load_error"], capped
    assert error.startswith(f"its plan's {E} experts ({plan_bytes} bytes of weights; 0 bytes of experts held) do not "
                            "fit in memory: layer 0: "), error
    assert "cannot allocate" in error, error  # what memory refused, from the allocator
    assert capped["health"].startswith("cannot load its experts after 600 s") and error in capped["health"], capped
    assert freed["registered"] and freed["held"] == E and freed["entry"]["weight_bytes"] == plan_bytes, freed
    assert freed["status"] == "ok" and freed["load_error"] is None and freed["health"] is None, freed
