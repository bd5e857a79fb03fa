"""What an operator's commands meet on the nodes and in the image: the shell `ray exec` runs in (cluster/*.yaml) and
the Docker build context (.dockerignore). Offline: no cloud, no Docker, no Ray cluster."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from tests.test_deploy_configs import CLUSTER_FILES, _load

# What Serve's CLI (`serve deploy`, `serve status`: HTTP to the dashboard) sends: Ray's token only when it is told
# that the cluster uses one (RAY_AUTH_MODE=token); the token file alone is not enough.
_PROBE = ("from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled as h\n"
          "print('HEADERS', sorted(k.lower() for k in h({})))\n")


def _exec_shell_env(config: dict, home) -> dict:
    """The environment of a `ray exec` command on a node: the container's `-e` options (docker:), then what the
    setup commands put in ~/.bashrc, which Ray's command runners source before the command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(home)
    for opt in (config.get("docker") or {}).get("run_options", []):
        words = shlex.split(opt)
        if words[0] == "-e" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    (home / ".bashrc").touch()
    for cmd in config.get("setup_commands", []):
        if ".bashrc" in cmd:
            subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=60)
    out = subprocess.run(["bash", "-c", "source ~/.bashrc && env -0"], env=env, capture_output=True, check=True,
                         timeout=60).stdout.decode()
    return dict(line.split("=", 1) for line in out.split("\0") if "=" in line)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_exec_serve_commands_send_the_cluster_token(path, tmp_path):
    """`ray exec cluster/<cloud>.yaml 'serve deploy ...'` (docs/DEPLOY.md): the dashboard of a RAY_AUTH_MODE=token
    cluster refuses a request without the token, so the exec shell must enable token auth for Ray's clients."""
    config = _load(path)
    assert config["file_mounts"]["~/.ray/auth_token"]  # the token is at Ray's default path on every node
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0123456789abcdef" * 4)
    env = _exec_shell_env(config, tmp_path)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert "HEADERS" in out.stdout, out.stderr[-2000:]
    assert "HEADERS ['authorization']" in out.stdout, f"{path.name}: `ray exec ... serve deploy` sends no token"
