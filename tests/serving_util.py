"""Helpers for the end-to-end tests: Serve configs with several apps, deploy-and-wait, handles, references."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import yaml

from elasticmoe.client import GenerationClient
from elasticmoe.local_cluster import app_entry, serve_config  # noqa: F401 - re-exported for the tests
from elasticmoe.model.skewed import make_skewed_model  # noqa: F401

GRPC = "127.0.0.1:9000"
REPO = Path(__file__).resolve().parent.parent


def deploy(lc, apps: list[dict], path: Path, timeout: float = 600) -> None:
    """`serve deploy` a config with these apps and wait until every one is RUNNING. ELASTICMOE_E2E_TRANSPORT
    (unary, stream, socket) sets every app's limits.transport: the e2e tests on another gateway -> shard wire."""
    wire = os.environ.get("ELASTICMOE_E2E_TRANSPORT")
    if wire:
        apps = [{**a, "args": {**a["args"], "limits": {**a["args"].get("limits", {}), "transport": wire}}}
                for a in apps]
    path.write_text(yaml.safe_dump(serve_config(apps)))
    lc.serve_deploy(path)
    for app in apps:
        lc.wait_running(app["name"], timeout=timeout)


def handle(deployment: str, app: str):
    """A DeploymentHandle from this (driver) process, connecting to the local cluster once."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"})
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    return serve.get_deployment_handle(deployment, app_name=app)


class Load:
    """Threads sending greedy streams in a loop until stopped; every answer checked against the reference."""

    def __init__(self, app: str, reference: dict, prompts: list[str], max_tokens: int, n: int = 4):
        self.app, self.ref, self.stop = app, reference, threading.Event()
        self.prompts, self.max_tokens = prompts, max_tokens
        self.done: list[tuple[float, float, int]] = []  # (first token at, last token at, tokens) per request
        self.bad: list[str] = []
        self.progress: dict[int, int] = {}  # thread -> tokens so far of its request in flight (none between requests)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        client, k = GenerationClient(GRPC, app=self.app), i
        while not self.stop.is_set():
            p, toks, times = self.prompts[k % len(self.prompts)], [], []
            k += len(self.threads)
            try:
                for r in client.stream(p, max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True):
                    toks += r.token_ids
                    times.append(time.time())
                    self.progress[i] = len(toks)
            except Exception as e:  # noqa: BLE001 - counted
                self.bad.append(f"{p!r} failed: {e!r}")
                continue
            finally:
                self.progress.pop(i, None)
            if toks != self.ref[p]:
                self.bad.append(f"{p!r} diverged")
            self.done.append((times[0], times[-1], len(toks)))

    def wait_mid(self, timeout: float = 60.0) -> None:
        """Until some request has streamed at least one token and at most half of them: a fault injected now lands
        mid-stream (the threads' requests run in lock step, so a random instant can fall between requests of all)."""
        deadline = time.monotonic() + timeout
        while not any(1 <= n <= self.max_tokens // 2 for n in list(self.progress.values())):
            assert time.monotonic() < deadline, f"no request mid-way within {timeout} s"
            time.sleep(0.002)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)
        assert not self.bad, self.bad[:5]
        assert not any(t.is_alive() for t in self.threads), "a load thread's request never ended"

    def tpot(self, t0: float, t1: float) -> list[float]:
        """Seconds per output token of the requests that overlap [t0, t1]."""
        return [(b - a) / (n - 1) for a, b, n in self.done if a <= t1 and b >= t0 and n > 1]
