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


def _dockerignore_rx(pattern: str):
    import re

    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _docker_context_excludes(rel: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches the path or one of its parent directories wins;
    `!` patterns put it back."""
    from tests.test_deploy_configs import ROOT

    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for line in (line for line in lines if line and not line.startswith("#")):
        negate = line.startswith("!")
        rx = _dockerignore_rx(line.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_docker_build_context_holds_the_package_and_no_secrets():
    """`docker build .` from the checkout where docs/DEPLOY.md's commands ran: the package reaches the image,
    secret files and the rest of the checkout do not."""
    from tests.test_deploy_configs import ROOT

    needed = subprocess.run(["git", "ls-files", "elasticmoe", "protos"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split() + ["pyproject.toml", "README.md"]
    assert [f for f in needed if _docker_context_excludes(f)] == []
    secrets = ["api-keys.txt", "hf_token", "ray_token", ".env", "tls/node/tls.key", "ca.key", "tls.pem",
               ".cache/elasticmoe/tls/ca.key", "elasticmoe/tls.key"]
    rest = [".git/config", ".venv/bin/python", "tests/conftest.py", "helm/elasticmoe/values.yaml", "dist/x.whl",
            "elasticmoe/__pycache__/app.cpython-311.pyc", "models/model.safetensors", "Dockerfile"]
    assert [f for f in secrets + rest if not _docker_context_excludes(f)] == []


def test_deploy_doc_serve_deploy_from_your_machine_sends_the_token(tmp_path):
    """docs/DEPLOY.md's `serve deploy deployments/<gpu model>.yaml` from the operator's machine (through
    `ray dashboard`): the cluster's dashboard wants Ray's token, which lies at ~/.config/elasticmoe/ray_token there,
    not at Ray's default path; the command as written must make Serve's CLI send it."""
    import re

    from tests.test_deploy_configs import ROOT

    text = " ".join((ROOT / "docs" / "DEPLOY.md").read_text().split())
    commands = [c for c in re.findall(r"`([^`]*serve deploy deployments/[^`]+)`", text) if "tiny.yaml" not in c]
    assert commands, "docs/DEPLOY.md shows no `serve deploy` of a GPU config from your machine"
    (tmp_path / ".config" / "elasticmoe").mkdir(parents=True)
    (tmp_path / ".config" / "elasticmoe" / "ray_token").write_text("0123456789abcdef" * 4)
    for cmd in commands:
        words = shlex.split(cmd)
        assignments = dict(w.split("=", 1) for w in words[:words.index("serve")])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env["HOME"] = str(tmp_path)
        env.update({k: v.replace("~", str(tmp_path), 1) if v.startswith("~/") else v for k, v in assignments.items()})
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
        assert "HEADERS ['authorization']" in out.stdout, f"`{cmd}` sends no token: {out.stdout}{out.stderr[-500:]}"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_config_comments_state_the_auth_mode_it_starts(path):
    """The comment above the start commands says what they do: Ray's token authentication (RAY_AUTH_MODE=token),
    never that it is off (an operator reading "disabled" would rely on the firewall alone)."""
    text = path.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "RAY_AUTH_MODE=disabled" not in comments and "no Ray token authentication" not in comments
    assert "RAY_AUTH_MODE=token" in comments
