"""Serve's gRPC proxy takes a message of up to 2 GiB by Ray's default (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE) and hands it
to a gateway replica before the API key is checked; every place that starts Ray sets it to 4 MiB, the cap of our own
entry points (HTTP limits.max_body_bytes, the direct_grpc port): the local cluster, each cluster/*.yaml's `ray start`
commands, the chart's Ray pods (head, workers, gateways) and the Dockerfile's ENV. The proxy refusing a larger
message: the e2e check."""

from __future__ import annotations

import re

import pytest

from elasticmoe import local_cluster as lc
from tests.helm_util import _containers, _objects, _one, _render
from tests.test_deploy_configs import CLUSTER_FILES, ray_start_envs

NAME, LIMIT = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "4194304"


def test_the_limit_is_our_own_entry_points_cap():
    from elasticmoe.config import Limits

    assert lc.GRPC_MAX_MESSAGE_ENV == NAME and str(lc.GRPC_MAX_MESSAGE_BYTES) == LIMIT
    assert Limits().max_body_bytes == lc.GRPC_MAX_MESSAGE_BYTES


def test_ray_env_sets_it_and_an_operators_value_wins(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    assert lc.ray_env()[NAME] == LIMIT
    monkeypatch.setenv(NAME, "1048576")
    assert lc.ray_env()[NAME] == "1048576"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_configs_start_ray_with_it(path, tmp_path):
    """Each `ray start` command, run by bash up to the `ray start` itself (replaced by printenv), exports it."""
    for cmd, value, err in ray_start_envs(path, NAME, tmp_path):
        assert value == LIMIT, (path.name, cmd, err)


def _ray_envs(values: dict | None = None) -> list[dict]:
    rs = _one(_objects(_render(values)), "RayService")
    return [{e["name"]: e.get("value") for e in c["env"]} for _, c in _containers(rs)]


@pytest.mark.parametrize("values", [None, {"directGrpc": {"enabled": True}}], ids=["default", "gateway-group"])
def test_chart_sets_it_on_every_ray_pod(values):
    envs = _ray_envs(values)
    assert len(envs) >= (3 if values else 2)  # head, workers (, gateways)
    assert all(env.get(NAME) == LIMIT for env in envs), envs


def test_chart_value_overrides_it():
    assert {env[NAME] for env in _ray_envs({"serve": {"grpcMaxMessageBytes": 1048576}})} == {"1048576"}


def _dockerfile_env() -> dict[str, str]:
    """The image's ENV settings: every ENV instruction of the real Dockerfile, continuation lines joined."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    env: dict[str, str] = {}
    for instr in re.split(r"\n(?=\S)", "\n".join(lines).replace("\\\n", " ")):
        if instr.startswith("ENV "):
            env.update(word.split("=", 1) for word in shlex.split(instr[4:]))
    return env


def test_image_sets_it_for_a_ray_started_any_other_way():
    """`docker run <image> ray start ...` (compose, a plain VM, a chart of one's own) gets 4 MiB too, not 2 GiB;
    the chart's and cluster configs' own settings still win (pod env and the command line override ENV)."""
    env = _dockerfile_env()
    assert env.get("HF_HOME") == "/models", env  # the parser reads the file's ENV
    assert env.get(NAME) == LIMIT, env
