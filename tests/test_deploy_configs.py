"""Offline checks of the Ray cluster-launcher configs (cluster/) and the Serve configs (deployments/):
Ray's own config validator, Serve's pydantic schema, elasticmoe's AppArgs (the chart: test_helm_chart.py)."""

from __future__ import annotations

import copy
import importlib
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"
DEPLOYMENTS_DIR = ROOT / "deployments"
CHART_DIR = ROOT / "helm" / "elasticmoe"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"

CLUSTER_FILES = sorted(CLUSTER_DIR.glob("*.yaml"))
DEPLOYMENT_FILES = sorted(DEPLOYMENTS_DIR.glob("*.yaml"))
GPU_DEPLOYMENTS = [p for p in DEPLOYMENT_FILES if p.name != "tiny.yaml"]

SERVICER = "elasticmoe.rpc.serve_proxy.add_generation_servicer"
IMPORT_PATH = "elasticmoe.app:build_app"
RELEASE, NAMESPACE = "moe", "llm"


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are ~1 MB each


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=_YAML_LOADER)


def ray_start_envs(path: Path, name: str, home: Path) -> list[tuple[str, str, str]]:
    """(command, $name as it has it, bash's stderr) for each `ray start` command of the cluster config `path` (head
    and worker): the command run by bash up to the `ray start` itself, which printenv replaces. Two commands, else
    AssertionError."""
    config = _load(path)
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if re.search(r"\bray start\b", c)]
    assert len(starts) == 2, starts
    out = []
    for cmd in starts:
        probe = re.sub(r"\S*\bray start\b.*", f"printenv {name}", cmd, flags=re.S)
        run = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30,
                             env={"HOME": str(home), "PATH": "/usr/bin:/bin", "RAY_HEAD_IP": "10.0.0.1"})
        out.append((cmd, run.stdout.strip(), run.stderr))
    return out


def _pyproject() -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pin(name: str) -> str:
    """The version elasticmoe pins for a dependency (`name==X` in pyproject.toml)."""
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}")


# --------------------------------------------------------------------------------------
# cluster/*.yaml: Ray's cluster-launcher validator
# --------------------------------------------------------------------------------------


def _prepare_and_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_configs_present():
    assert {p.stem for p in CLUSTER_FILES} >= {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_config_passes_ray_validator(path):
    config = _load(path)
    prepared = _prepare_and_validate(config)
    head = prepared["head_node_type"]
    assert head in prepared["available_node_types"]
    start = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
    # Ray's token auth and elasticmoe's mTLS, both from files every node gets (file_mounts): never disabled.
    assert start.count("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token") == 2
    assert "RAY_AUTH_MODE=disabled" not in start and "insecure_internal" not in start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.config/elasticmoe/ray_token"
    assert config["file_mounts"]["~/elasticmoe/tls"] == "~/.config/elasticmoe/tls/node"
    for var, name in (("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key")):
        assert start.count(f"ELASTICMOE_TLS_{var}=~/elasticmoe/tls/{name}") == 2
    assert start.count("ELASTICMOE_EXPERT_HOST=node_ip") == 2  # shards reachable from other nodes
    assert "--dashboard-host=127.0.0.1" in start  # reached over SSH (`ray dashboard`)
    # elasticmoe reaches the nodes: the container image, or a pip install of the pinned wheel.
    setup = " ".join(prepared["setup_commands"])
    if config.get("docker"):
        assert re.search(r"elasticmoe:\d+\.\d+\.\d+$", config["docker"]["image"])
    else:
        version = _pyproject()["project"]["version"]
        assert f"elasticmoe-{version}-py3-none-any.whl" in setup
        assert f"torch=={_pin('torch')}" in setup
    if config["provider"]["type"] != "local":
        # A GPU worker node type with its resources declared for the autoscaler.
        gpu_types = [t for name, t in prepared["available_node_types"].items()
                     if name != head and t["resources"].get("GPU", 0) >= 1]
        assert gpu_types, "no GPU worker node type"
        assert prepared["available_node_types"][head]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage", ["unknown_top_level_key", "wrong_type"])
def test_cluster_config_broken_copy_fails(path, breakage):
    config = _load(path)
    if breakage == "unknown_top_level_key":
        config["max_worker"] = 4  # typo of max_workers
    else:
        config["cluster_name"] = {"name": "elasticmoe"}
    with pytest.raises(jsonschema.ValidationError):
        _prepare_and_validate(config)


def test_cluster_configs_agree_with_pins():
    """The image / wheels the cluster configs install match pyproject.toml."""
    aws = _load(CLUSTER_DIR / "aws.yaml")
    assert aws["docker"]["image"].endswith(":" + _pyproject()["project"]["version"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"rayproject/ray:{_pin('ray')}-py311-cu" in dockerfile
    assert f"ARG TORCH_VERSION={_pin('torch')}" in dockerfile
    assert "download.pytorch.org/whl/cu" in dockerfile
    # .dockerignore: tests/test_deploy_hardening.py


# --------------------------------------------------------------------------------------
# deployments/*.yaml: Serve's schema, the import path, AppArgs
# --------------------------------------------------------------------------------------


def _serve_schema(config: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(config)


def _app_args(args: dict):
    from elasticmoe.config import AppArgs

    return AppArgs.model_validate(args)


def test_deployment_configs_present():
    assert {p.stem for p in DEPLOYMENT_FILES} >= {"tiny", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite"}


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_deployment_config_valid(path):
    config = _load(path)
    schema = _serve_schema(config)
    assert schema.grpc_options.port == 9000
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER]
    assert schema.http_options.port == 8000
    assert len(schema.applications) == 1
    for app in schema.applications:
        assert app.import_path == IMPORT_PATH
        assert app.route_prefix == "/"
        assert "working_dir" not in app.runtime_env  # must be a remote URI: the package is pip-installed
        _app_args(app.args)


def test_tiny_deployment_fits_a_laptop():
    schema = _serve_schema(_load(DEPLOYMENTS_DIR / "tiny.yaml"))
    assert schema.http_options.host == "127.0.0.1"
    args = _app_args(schema.applications[0].args)
    assert args.model == "tiny:mixtral"
    assert (args.num_gateways, args.num_shards, args.device) == (1, 2, "cpu")
    cpus = args.num_gateways * args.gateway_resources.num_cpus + args.num_shards * args.shard_resources.num_cpus
    assert cpus <= 2, "tiny.yaml must fit a 2-core machine"
    assert args.gateway_resources.num_gpus == args.shard_resources.num_gpus == 0


def test_tiny_yaml_is_the_config_the_demo_deploys():
    """`elasticmoe demo` deploys deployments/tiny.yaml (with its --model) from the package, which a wheel or the
    image holds without deployments/ (its default was the checkout's file: 'cannot be read' once installed): the
    package's copy, local_cluster.tiny_serve_config(), is the YAML file, key for key."""
    from elasticmoe.local_cluster import tiny_serve_config

    assert _load(DEPLOYMENTS_DIR / "tiny.yaml") == tiny_serve_config()
    assert tiny_serve_config("tiny:demo")["applications"][0]["args"]["model"] == "tiny:demo"


@pytest.mark.parametrize("path", GPU_DEPLOYMENTS, ids=lambda p: p.name)
def test_gpu_deployment_is_realistic(path):
    args = _app_args(_serve_schema(_load(path)).applications[0].args)
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    # A hub id at a revision, looked up in the Hugging Face cache on /models, offline.
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", args.model) and args.revision
    env = _serve_schema(_load(path)).applications[0].runtime_env["env_vars"]
    assert env["HF_HOME"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert args.gateway_resources.accelerator_type == args.shard_resources.accelerator_type
    assert args.shard_resources.num_gpus == 1 and args.gateway_resources.num_gpus == 1
    assert args.autoscaling is not None
    assert args.autoscaling.min_shards <= args.num_shards <= args.autoscaling.max_shards
    app = _serve_schema(_load(path)).applications[0]
    assert app.runtime_env["env_vars"]["ELASTICMOE_EXPERT_HOST"] == "node_ip"  # multi-node
    assert path.read_text().lstrip().startswith("#"), "each config explains itself"


GPU_DEPLOYMENT_FILES = [p for p in DEPLOYMENT_FILES if p.stem != "tiny"]


@pytest.mark.parametrize("which", ["gateway_resources", "shard_resources"])
@pytest.mark.parametrize("path", GPU_DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_a_cuda_replica_without_a_gpu_is_refused_naming_it(path, which):
    """device: cuda with a replica's num_gpus at 0 was accepted: Ray then reserves no GPU for it, leaves
    CUDA_VISIBLE_DEVICES alone, and the replica takes GPU 0 of its node beside the shard Ray gave it to (or fails
    at start on a CPU node). The app build refuses it naming the field, as the chart's render does."""
    from elasticmoe.app import resolve_args

    args = copy.deepcopy(_serve_schema(_load(path)).applications[0].args)
    args[which]["num_gpus"] = 0
    with pytest.raises(ValueError, match=rf"{which}\.num_gpus is 0 but device is cuda"):
        resolve_args(args)
    args[which]["num_gpus"] = 0.5  # a fraction of a GPU is a GPU
    assert getattr(_app_args(args), which).num_gpus == 0.5


def test_servicer_function_imports():
    module, name = SERVICER.rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_import_path_imports(path):
    for app in _serve_schema(_load(path)).applications:
        module_name, attr = app.import_path.split(":")
        module = importlib.import_module(module_name)  # a module that does not exist fails the config
        assert callable(getattr(module, attr)), f"{app.import_path} is not callable"


# --------------------------------------------------------------------------------------
# cluster/*.yaml x deployments/*.yaml: every node that runs a replica holds its weights
# --------------------------------------------------------------------------------------


def _downloads(commands: list[str]) -> list[dict]:
    """The `hf download` command lines among setup commands: repo, revision, include patterns."""
    import shlex

    found = []
    for cmd in commands:
        words = shlex.split(cmd.split("||")[0])
        if "download" not in words or not any(w.endswith("hf") for w in words):
            continue
        i = words.index("download")
        assert words[i - 1].endswith("hf"), cmd
        rest = words[i + 1:]
        includes = [rest[j + 1] for j, w in enumerate(rest) if w == "--include"]
        positional = [w for j, w in enumerate(rest)
                      if not w.startswith("--") and (j == 0 or not rest[j - 1].startswith("--"))]
        assert positional == [rest[0]], f"files after the repo id make `hf download` ignore --include: {cmd}"
        assert "HF_HOME=/models" in words, cmd
        assert 'HF_TOKEN="$(cat ~/elasticmoe/hf_token 2>/dev/null)"' in cmd, "no token from the environment"
        found.append({"repo": rest[0], "revision": rest[rest.index("--revision") + 1], "include": includes})
    return found


def _node_commands(prepared: dict) -> dict[str, list[str]]:
    """node type -> the setup commands Ray runs on it (a node type's own list replaces the merged global one)."""
    head = prepared["head_node_type"]
    return {name: prepared["head_setup_commands"] if name == head else t.get("worker_setup_commands",
                                                                             prepared["worker_setup_commands"])
            for name, t in prepared["available_node_types"].items()}


def _deployment_args(name: str):
    return _app_args(_serve_schema(_load(DEPLOYMENTS_DIR / name)).applications[0].args)


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_config_downloads_what_it_serves(path):
    """The deployment a cluster config documents, and every deployment whose accelerator type one of its node types
    has, are downloaded at their revision: the whole model on the nodes that run its replicas, at least the
    config files on the head (where Serve builds the app and resolves the revision)."""
    config = _load(path)
    prepared = _prepare_and_validate(config)
    assert config["file_mounts"]["~/elasticmoe/hf_token"] == "~/.config/elasticmoe/hf_token"
    (documented,) = re.findall(r"serve deploy ~/elasticmoe/deployments/(\S+\.yaml)", path.read_text().split("\n\n")[0])
    commands = _node_commands(prepared)
    head = prepared["head_node_type"]
    wanted = {documented} | {p.name for p in GPU_DEPLOYMENTS if any(
        f"accelerator_type:{_deployment_args(p.name).shard_resources.accelerator_type}" in t["resources"]
        for t in prepared["available_node_types"].values())}
    for name in wanted:
        args = _deployment_args(name)
        accel = args.shard_resources.accelerator_type
        hosts = [n for n, t in prepared["available_node_types"].items()
                 if (f"accelerator_type:{accel}" in t["resources"] if accel else t["resources"].get("GPU", 1) > 0
                     or config["provider"]["type"] == "local")]
        assert hosts, f"{path.name}: no node type can run {name}"
        for node in set(hosts) | {head}:
            got = [d for d in _downloads(commands[node]) if d["repo"] == args.model]
            assert got and all(d["revision"] == args.revision for d in got), f"{path.name}:{node} lacks {name}"
            patterns = {p for d in got for p in d["include"]}
            assert "*.json" in patterns
            if node in hosts:
                assert "*.safetensors" in patterns, f"{path.name}:{node} runs {name} without its weights"
    if config["provider"]["type"] != "local":  # the head runs no replica: no weights there
        assert all("*.safetensors" not in d["include"] for d in _downloads(commands[head]))


def test_cluster_download_command_runs(tmp_path, monkeypatch):
    """The H100 nodes' command of cluster/aws.yaml, run by bash and the real `hf` CLI offline against a cache that
    holds the revision, succeeds; elasticmoe resolves the same snapshot for deployments/qwen3-30b-a3b.yaml."""
    import os
    import subprocess
    import sys

    from elasticmoe.model.hub import resolve

    prepared = _prepare_and_validate(_load(CLUSTER_DIR / "aws.yaml"))
    (cmd,) = [c for c in _node_commands(prepared)["gpu_h100"] if " download " in c]
    args = _deployment_args("qwen3-30b-a3b.yaml")
    repo = tmp_path / "hub" / ("models--" + args.model.replace("/", "--"))
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / args.revision).write_text(commit)
    local = cmd.replace("HF_HOME=/models", f"HF_HOME={tmp_path}").replace("~/elasticmoe/hf_token", str(tmp_path / "t"))
    search_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": search_path}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(["bash", "-c", local], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].strip().removeprefix("path:").strip() == str(repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert resolve(args.model, args.revision).path == repo / "snapshots" / commit
