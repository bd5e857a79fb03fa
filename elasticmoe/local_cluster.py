"""A real local Ray cluster on 127.0.0.1: `ray start --head`, `serve deploy`, wait for RUNNING, `ray stop`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from elasticmoe.rpc import serve_http_proxy
from elasticmoe.rpc.options import PROXY_MESSAGE_BYTES, PROXY_MESSAGE_ENV

DASHBOARD = "http://127.0.0.1:8265"
METRICS_PORT = 8080  # Ray's Prometheus endpoint: http://127.0.0.1:8080/metrics
# Serve's gRPC proxy's message limit (Ray reads it in each proxy: set it for every Ray process), in bytes; the
# gateway reads it too, for the largest Generate answer it sends (rpc.options.answer_bytes)
GRPC_MAX_MESSAGE_ENV = PROXY_MESSAGE_ENV
GRPC_MAX_MESSAGE_BYTES = PROXY_MESSAGE_BYTES


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Ray process and client: loopback only, no auth, our venv's binaries first."""
    env = dict(os.environ)
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"})
    # Serve kills a proxy not ready within 5 s and fails the deploy (ActorDiedError: killed by ray.kill); on 2 busy
    # cores the proxy's start (Ray, gRPC and our servicer's imports) has taken longer
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
    # Serve's gRPC proxy takes messages of up to 2 GiB (Ray's default) before the gateway checks the API key; our
    # own entry points cap a request at 4 MiB (HTTP limits.max_body_bytes, the direct_grpc port): so does it now
    env.setdefault(GRPC_MAX_MESSAGE_ENV, str(GRPC_MAX_MESSAGE_BYTES))
    # Serve's HTTP proxy reads a whole body into memory while the request waits for a gateway (which checks the key):
    # rpc.serve_http_proxy caps it at 4 MiB there
    env.setdefault(serve_http_proxy.CALLBACK_ENV, serve_http_proxy.CALLBACK)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _current_cluster() -> str | None:
    """The address `ray.init(address="auto")` would join: Ray's ray_current_cluster file, if there is one."""
    path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def use_local_ray_env(address: str = "auto") -> bool:
    """Before this process imports Ray: when `address` is the loopback cluster that start_ray made ("auto" naming
    it, or a 127.0.0.1 / localhost address), put ray_env()'s RAY_ settings into os.environ, so the driver joins it
    on 127.0.0.1 the way it was started (Ray reads them at import: set later, a driver resolves the node's other
    address and waits for a GCS that is not there). A remote address is left to the caller's own settings.
    Returns whether it applied them."""
    target = _current_cluster() if address == "auto" else address
    host = (target or "127.0.0.1").removeprefix("ray://").rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        return False
    os.environ.update({k: v for k, v in ray_env().items() if k.startswith("RAY_")})
    return True


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _run(args: list[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=ray_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def start_ray(num_cpus: int | None = None, port: int = 6379, temp_dir: str | None = None,
              resources: dict[str, float] | None = None, log_monitor: bool = True) -> None:
    """`ray start --head` bound to 127.0.0.1 with the dashboard (needed by `serve deploy`) on 127.0.0.1:8265;
    `resources`: custom Ray resources of the node (what a replica's `resources` asks for); `log_monitor=False`:
    no process tails the workers' log files to print them on drivers (they stay in the session's logs/)."""
    args = [_bin("ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", "--dashboard-port=8265", "--disable-usage-stats",
            f"--metrics-export-port={METRICS_PORT}"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    if temp_dir:
        args.append(f"--temp-dir={temp_dir}")
    if not log_monitor:
        args.append("--include-log-monitor=false")
    _run(args, timeout=180)
    _wait_dashboard()


def _wait_dashboard(timeout: float = 120) -> None:
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"{DASHBOARD}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the Ray dashboard did not come up on 127.0.0.1:8265")


def stop_ray() -> None:
    _run([_bin("ray"), "stop", "--force"], timeout=120, check=False)


def serve_deploy(config: str | Path) -> None:
    """`serve deploy CONFIG` against the local dashboard."""
    _run([_bin("serve"), "deploy", str(config), "-a", DASHBOARD], timeout=120)


def serve_status() -> dict:
    """The dashboard's Serve details (what `serve status` prints, read over HTTP: polling the CLI started a Python
    process that imported Ray, about 1.5 s of CPU per poll); {} while the dashboard does not answer."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{DASHBOARD}/api/serve/applications/", timeout=30) as r:
            return json.loads(r.read()) or {}
    except (OSError, ValueError):
        return {}


def wait_running(app: str = "elasticmoe", timeout: float = 600) -> dict:
    """Poll `serve status` until the app is RUNNING; raise with the status on DEPLOY_FAILED or timeout."""
    t0 = time.monotonic()
    status: dict = {}
    while time.monotonic() - t0 < timeout:
        status = serve_status()
        state = ((status.get("applications") or {}).get(app) or {}).get("status")
        if state == "RUNNING":
            return status
        if state == "DEPLOY_FAILED":
            raise RuntimeError(f"serve deploy failed:\n{_summary(status, app)}")
        time.sleep(0.5)
    raise TimeoutError(f"app {app!r} not RUNNING after {timeout:.0f}s:\n{_summary(status, app)}")


def _summary(status: dict, app: str) -> str:
    """The app's state and message and each deployment's, as YAML (the details without the replica lists)."""
    a = (status.get("applications") or {}).get(app) or {}
    deps = {name: {"status": d.get("status"), "message": d.get("message")}
            for name, d in (a.get("deployments") or {}).items()}
    return yaml.safe_dump({app: {"status": a.get("status"), "message": a.get("message"), "deployments": deps}})


# ----- Serve configs for a local cluster (tests, benchmarks)
def app_entry(name: str, model: str, num_shards: int, **kw) -> dict:
    """One application of a Serve config, with small CPU resources and limits."""
    limits = {"max_num_seqs": 8, "max_model_len": 256, "max_queue": 32, "max_num_batched_tokens": 256,
              "expert_timeout_s": 5.0}
    limits.update(kw.pop("limits", {}))
    args = {"model": str(model), "num_shards": num_shards, "dtype": "float32", "device": "cpu",
            "gateway_resources": {"num_cpus": 0.5}, "shard_resources": {"num_cpus": 0.25}, "limits": limits}
    args.update(kw)
    return {"name": name, "route_prefix": f"/{name}", "import_path": "elasticmoe.app:build_app", "args": args}


def serve_config(apps: list[dict]) -> dict:
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "grpc_options": {"port": 9000, "grpc_servicer_functions": [
                "elasticmoe.rpc.serve_proxy.add_generation_servicer"]},
            "applications": apps}


def tiny_serve_config(model: str = "tiny:mixtral") -> dict:
    """deployments/tiny.yaml (`elasticmoe demo` deploys it with its --model), built here: an installed package has
    no deployments/ folder. tests/test_deploy_configs.py checks that the YAML file is this config."""
    limits = {"max_num_seqs": 8, "max_model_len": 512, "max_queue": 32, "max_num_batched_tokens": 512,
              "expert_timeout_s": 5.0}
    args = {"model": model, "num_shards": 2, "num_gateways": 1, "dtype": "float32", "device": "cpu",
            "gateway_resources": {"num_cpus": 0.5}, "shard_resources": {"num_cpus": 0.5}, "limits": limits,
            "expert_metrics": "per_expert"}
    return serve_config([{"name": "elasticmoe", "route_prefix": "/", "import_path": "elasticmoe.app:build_app",
                          "args": args}])


# ----- Fault injection helpers (tests, benchmarks/stalls.py): which process to kill or pause
def shard_pids(app: str, count: int = 2, tries: int = 100) -> dict[str, int]:
    """shard id -> pid of up to `count` ExpertShard replicas of `app` (Serve picks a replica per call: ask until seen).
    Needs a driver connected to the cluster (ray.init)."""
    from ray import serve

    shards, pids = serve.get_deployment_handle("ExpertShard", app_name=app), {}
    for _ in range(tries):
        info = shards.info.remote().result()
        pids[info["shard_id"]] = info["pid"]
        if len(pids) >= count:
            break
    return pids


def sole_holder(app: str) -> int:
    """pid of the live shard holding the most experts that have no other copy (a fault there is a true single-copy
    fault); raises when every expert has a second copy."""
    from ray import serve

    status = serve.get_deployment_handle("Controller", app_name=app).status.remote().result(timeout_s=60)
    sole = {s["id"]: s["sole_copies"] for s in status["shards"] if s["healthy"]}
    pids = shard_pids(app, count=len(sole))
    victim = max(sole, key=sole.get)
    if not sole[victim]:
        raise RuntimeError(f"{app}: every expert has a second copy, no single-copy fault possible: {sole}")
    return pids[victim]
