"""Helpers for the end-to-end tests: Serve configs with several apps, deploy-and-wait, handles, references."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from elasticmoe.local_cluster import app_entry, serve_config  # noqa: F401 - re-exported for the tests
from elasticmoe.model.skewed import make_skewed_model  # noqa: F401

GRPC = "127.0.0.1:9000"
REPO = Path(__file__).resolve().parent.parent


def deploy(lc, apps: list[dict], path: Path, timeout: float = 600) -> None:
    """`serve deploy` a config with these apps and wait until every one is RUNNING. ELASTICMOE_E2E_TRANSPORT
    (unary, stream, socket) sets every app's limits.transport: the e2e tests on another gateway -> shard wire."""
    wire = os.environ.get("ELASTICMOE_E2E_TRANSPORT")
    if wire:
        apps = [{**a, "args": {**a["args"], "limits": {**a["args"].get("limits", {}), "transport": wire}}} for a in apps]
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
