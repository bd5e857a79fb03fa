"""Shared fixtures: tiny checkpoints written by transformers, and one real local Ray cluster per session."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("ELASTICMOE_CACHE", str(REPO / ".cache" / "elasticmoe"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# OpenMP threads that finish a parallel region sleep at once instead of spinning: on the 2-core CI host the suite's
# torch work spun ~45% more CPU than it used (test_families beside one niced busy loop: 29-30 s user CPU unset, 20.5 s
# PASSIVE, wall 24 vs 22 s), CPU the e2e replicas beside it wait for. Inherited by subprocesses and the test cluster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
GATEWAY_RESOURCE = "elasticmoe_gateway"  # the custom Ray resource of the chart's gateway worker group
_CPU0 = pytest.StashKey[float]()  # CPU seconds at a test's setup


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> checkpoint dir (3 layers, 8 experts), made once per session."""
    from elasticmoe.model.tiny import TINY_FAMILIES, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f, layers=3, experts=8) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real `ray start --head` on 127.0.0.1, stopped at the end of the session. Its node declares
    GATEWAY_RESOURCE as a gateway worker group of the Helm chart does (directGrpc)."""
    from elasticmoe import local_cluster as lc

    lc.stop_ray()
    # No log monitor: the tests' driver connects with log_to_driver=False, so nothing reads what it forwards, and it
    # polled every worker's log files: 77 s of CPU in a 25-minute e2e run (2026-12-07); the files stay in logs/.
    lc.start_ray(num_cpus=8, resources={GATEWAY_RESOURCE: 4}, log_monitor=False)
    yield lc
    import ray
    from ray._private import auto_init_hook

    # The tests' handles leave Serve router threads in this driver that call ray.wait on a timer; after shutdown,
    # Ray's auto-init connected them again, and once `ray stop` took the GCS away that connection ended this process
    # 60 s later, exit status 1 after every test had passed (ELASTICMOE_E2E_TRANSPORT=unary, 2026-12-07)
    auto_init_hook.enable_auto_connect = False
    if ray.is_initialized():  # tests' driver connection (tests.serving_util.handle)
        ray.shutdown()
    lc.stop_ray()



def pytest_collection_modifyitems(config, items):
    """The wheel's e2e test first: it runs its own Ray cluster on the fixed ports, so before the session's
    `ray_cluster` starts it has nothing to stop and restart. The modules of tests/wait_bound.py get the marker
    `waits` (`make test` runs them in a process of their own)."""
    from tests.wait_bound import WAIT_BOUND

    first = [i for i in items if i.nodeid.startswith("tests/test_wheel.py::") and i.get_closest_marker("e2e")]
    items[:] = first + [i for i in items if i not in first]
    for item in items:
        if Path(str(item.fspath)).stem in WAIT_BOUND:
            item.add_marker(pytest.mark.waits)


def _cpu_s() -> float:
    """CPU seconds of this process and of the children it has waited for (subprocess.run's)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def pytest_runtest_setup(item):
    item.stash[_CPU0] = _cpu_s()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each test's CPU seconds (setup and call) as a junit property `cpu_s` beside its wall time: a test whose
    cpu_s is far below its time waits (timeouts, sleeps, Ray), one near it computes (where to cut the suite's time)."""
    if call.when == "call" and _CPU0 in item.stash:
        item.user_properties.append(("cpu_s", round(_cpu_s() - item.stash[_CPU0], 2)))


