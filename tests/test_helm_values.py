"""Every values file of the chart rendered and held to KubeRay's CRD schema, the operator's admission rules
(tests/kuberay_rules.py) and what a first install and its upgrades need: autoscaler v2, gRPC on the serve Service,
drain, deletion delay, current scale, PDBs, a pinned weights download, accelerator types."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from tests.kuberay_rules import rayservice_errors
from tests.test_deploy_configs import CHART_DIR, NAMESPACE
from tests.helm_util import _check_rayservice, _containers, _crd_validator, _objects, _one, _render, _start_shards

PROD = "values-gpu-production.yaml"
VALUE_SETS = {  # name -> the -f files, in order (the model files go on top of the production values)
    "default": [],
    "gpu-production": [PROD],
    "qwen3-30b-a3b": [PROD, "values-qwen3-30b-a3b.yaml"],
    "deepseek-v2-lite": [PROD, "values-deepseek-v2-lite.yaml"],
}
GPU_SETS = [k for k in VALUE_SETS if k != "default"]


def _merge(base: dict, top: dict) -> dict:
    """Helm's -f layering: maps merge key by key, everything else (lists too) is replaced."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _values(name: str, **override) -> dict:
    values: dict = {}
    for f in VALUE_SETS[name]:
        values = _merge(values, helm.values_from_yaml((CHART_DIR / f).read_text()))
    return _merge(values, override)


def _rs(values: dict) -> dict:
    return _one(_objects(_render(values)), "RayService")


def _serve_args(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request):
    values = _values(request.param)
    return request.param, values, _objects(_render(values or None))


def test_every_values_file_is_rendered():
    assert {p.name for p in CHART_DIR.glob("values*.yaml")} == {"values.yaml"} | {f for fs in VALUE_SETS.values()
                                                                                    for f in fs}


def test_values_pass_crd_and_operator_rules(rendered):
    name, values, objs = rendered
    rs = _one(objs, "RayService")
    _check_rayservice(rs)  # CRD schema, Serve schema, AppArgs
    assert rayservice_errors(rs) == []
    report = helm.lint(str(CHART_DIR), values or None, kube_version="v1.30.0", namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    cluster = rs["spec"]["rayClusterConfig"]
    if cluster["enableInTreeAutoscaling"]:
        assert cluster["autoscalerOptions"]["version"] == "v2"
    assert {p["name"] for p in rs["spec"]["serveService"]["spec"]["ports"]} == {"serve", "serve-grpc"}
    pdb = _one(objs, "PodDisruptionBudget")
    workers = cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= workers.items() and pdb["spec"]["maxUnavailable"] == 1
    for spec, container in _containers(rs):  # Triton compiles into a volume, not the home directory
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[env["TRITON_CACHE_DIR"]] in {v["name"] for v in spec["volumes"]}


@pytest.mark.parametrize("name", GPU_SETS)
def test_gpu_values_upgrade_without_downtime(name):
    values = _values(name)
    rs = _rs(values)
    timeout = values["serve"]["requestTimeoutSeconds"]
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] >= timeout + 60  # streams finish on the old cluster
    assert re.fullmatch(r"\d+m", rs["metadata"]["annotations"]["ray.io/initializing-timeout"])
    group = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= timeout + 30
    script = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION" in script
    subprocess.run(["bash", "-n", "-c", script], check=True)  # valid shell
    head_meta = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert "elasticmoe.io/model-sha256" in head_meta["annotations"]
    assert pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0][
        "podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"


def test_drain_command_exists_in_this_ray():
    """`ray drain-node --help` of the `ray` CLI (ray.scripts.scripts:main is its click group), run in-process: a
    subprocess spent ~2.5 s of CPU importing ray again."""
    from click.testing import CliRunner
    from ray.scripts.scripts import cli

    result = CliRunner().invoke(cli, ["drain-node", "--help"])
    assert result.exit_code == 0, result.output
    assert "DRAIN_NODE_REASON_PREEMPTION" in result.output and "--deadline-remaining-seconds" in result.output


@pytest.mark.parametrize("name", GPU_SETS)
def test_gpu_values_download_and_place_the_model(name):
    values = _values(name)
    rs = _rs(values)
    args = _serve_args(rs)
    (init,) = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    cmd = init["command"]
    assert cmd[:3] == ["hf", "download", args["model"]] and cmd[cmd.index("--revision") + 1] == args["revision"]
    assert "*.safetensors" in [cmd[i + 1] for i, a in enumerate(cmd) if a == "--include"]
    token = [e for e in init["env"] if e["name"] == "HF_TOKEN"]
    secret = values["model"]["download"]["hfTokenSecret"]["name"]
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in token] == ([secret] if secret else [])
    assert {"name": "model-cache", "mountPath": "/models"} in init["volumeMounts"]  # writable for the download
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "model-cache", "mountPath": "/models", "readOnly": True} in head["volumeMounts"]
    accel = args["shard_resources"]["accelerator_type"]
    assert args["gateway_resources"]["accelerator_type"] == accel
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["resources"] == {f"accelerator_type:{accel}": "1"}


def test_download_command_resolves_what_the_app_loads(tmp_path, monkeypatch):
    """The init container's command line, run by the real `hf` CLI offline against a cache holding the revision,
    succeeds and names the snapshot that elasticmoe's resolver picks for the app's model + revision."""
    from elasticmoe.model.hub import resolve

    rs = _rs(_values("qwen3-30b-a3b"))
    args = _serve_args(rs)
    cmd = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]["command"]
    repo = tmp_path / "hub" / ("models--" + args["model"].replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / args["revision"]).write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    hf = Path(sys.executable).parent / "hf"
    out = subprocess.run([str(hf), *cmd[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    snapshot = out.stdout.strip().splitlines()[-1].strip().removeprefix("path:").strip()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert str(resolve(args["model"], args["revision"]).path) == snapshot == str(repo / "snapshots" / commit)


def test_limits_change_keeps_the_cluster():
    """KubeRay builds a new cluster when rayClusterConfig changes (replicas aside): limits must not touch it."""
    base = _rs(_values("gpu-production"))
    limits = _rs(_values("gpu-production", limits={"maxNumSeqs": 32, "maxQueue": 64}))
    model = _rs(_values("gpu-production", model={"revision": "f" * 40}))
    assert limits["spec"]["rayClusterConfig"] == base["spec"]["rayClusterConfig"]
    assert limits["spec"]["serveConfigV2"] != base["spec"]["serveConfigV2"]
    assert model["spec"]["rayClusterConfig"] != base["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("current, pods, shards", [(None, 10, 8), (4, 10, 8), (14, 14, 12), (30, 18, 16)])
def test_new_cluster_starts_at_current_scale(current, pods, shards):
    """A new cluster's worker pods and its controller's first count (start_shards); the args keep `shards`."""
    rs = _rs(_values("gpu-production", upgrade={"currentWorkerReplicas": current}))
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == pods
    assert _start_shards(rs) == shards and _serve_args(rs)["num_shards"] == 8


def test_gcs_fault_tolerance_renders_valid():
    rs = _rs(_values("gpu-production", gcsFaultTolerance={"enabled": True}))
    _check_rayservice(rs)
    assert rayservice_errors(rs) == []
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith("redis://")
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "elasticmoe-redis", "key": "redis-password"}


def _break(rs: dict, how: str) -> dict:
    rs = copy.deepcopy(rs)
    spec, cluster = rs["spec"], rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    if how == "v1-autoscaler":
        del cluster["autoscalerOptions"]["version"]  # the chart before this change
    elif how == "no-serve-port":
        head["ports"] = [p for p in head["ports"] if not p["name"].startswith("serve")]
        del spec["serveService"]
    elif how == "incremental-without-options":
        spec["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade"}
    elif how == "negative-delay":
        spec["rayClusterDeletionDelaySeconds"] = -1
    elif how == "zero-timeout":
        rs["metadata"]["annotations"]["ray.io/initializing-timeout"] = "0s"
    elif how == "bad-timeout":
        rs["metadata"]["annotations"]["ray.io/initializing-timeout"] = "soon"
    elif how == "long-name":
        rs["metadata"]["name"] = "m" * 48
    elif how == "resources-twice":
        cluster["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = "8"
    elif how == "redis-env-without-ft":
        head["env"].append({"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"})
    elif how == "restart-policy-v2":
        cluster["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "OnFailure"
    return rs


@pytest.mark.parametrize("how, message", [
    ("v1-autoscaler", "idleTimeoutSeconds is set, but autoscaler v2 is not enabled"),
    ("no-serve-port", "port named 'serve'"),
    ("incremental-without-options", "ClusterUpgradeOptions are required"),
    ("negative-delay", "RayClusterDeletionDelaySeconds should be a non-negative integer"),
    ("zero-timeout", "must be a positive duration"),
    ("bad-timeout", "has invalid format"),
    ("long-name", "no more than 47 characters"),
    ("resources-twice", "both rayStartParams and Resources"),
    ("redis-env-without-ft", "RAY_REDIS_ADDRESS is set"),
    ("restart-policy-v2", "should be Never or unset"),
])
def test_operator_rules_catch_what_the_crd_schema_cannot(how, message):
    rs = _break(_rs(_values("gpu-production")), how)
    if how not in ("negative-delay", "long-name"):  # the schema passes these: only the operator refuses them
        assert _crd_validator("ray.io_rayservices.yaml").is_valid(rs)
    errors = rayservice_errors(rs)
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize("override, message", [
    ({"rayService": {"rayClusterDeletionDelaySeconds": 120}}, "must be >= serve.requestTimeoutSeconds"),
    ({"rayService": {"initializingTimeout": "soon"}}, "rayService.initializingTimeout"),
    ({"model": {"revision": None}}, "needs model.revision"),
    ({"model": {"path": "/models/mixtral"}}, "needs model.path to be a hub id"),
    ({"modelCache": {"type": "emptyDir"}}, "emptyDir"),
    ({"workers": {"terminationGracePeriodSeconds": 300}}, "terminationGracePeriodSeconds (300)"),
    ({"gatewayResources": {"acceleratorType": "L40S"}}, "differ"),
    ({"workers": {"rayStartParams": {"num-cpus": "8"}}}, "KubeRay refuses"),
    ({"gcsFaultTolerance": {"enabled": True, "redisAddress": ""}}, "redisAddress"),
    ({"upgrade": {"strategy": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {"gatewayClassName": "x"}},
      "rayAutoscaler": {"enabled": False}}, "needs rayAutoscaler.enabled"),
])
def test_inconsistent_production_values_fail_render(override, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(_values("gpu-production", **override))


def test_dashboard_filters_by_cluster():
    dash = json.loads((CHART_DIR / "dashboards" / "elasticmoe.json").read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names.index("namespace") < names.index("cluster") < names.index("layer")
    cluster = dash["templating"]["list"][names.index("cluster")]
    assert cluster["multi"] is False and cluster["includeAll"] is False  # one cluster at a time
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    selectors = [m for e in exprs for m in re.findall(r"ray_elasticmoe_\w+(\{[^}]*\})?", e)]
    assert selectors and all('ray_cluster=~"$cluster"' in s and 'namespace=~"$namespace"' in s for s in selectors)


@pytest.mark.parametrize("name,limit,written", [
    ("default", "absent", None),  # unset, as AppArgs: 2048, or the model's context where shorter
    ("gpu-production", None, None),  # a values file's own limit dropped again with maxModelLen: null
    ("gpu-production", "absent", 4096),
    ("default", 1024, 1024),
])
def test_max_model_len_left_null_is_left_unset_for_the_app(name, limit, written):
    """limits.maxModelLen: null (the default) writes no limits.max_model_len, so a model whose context is under
    2048 deploys with its own context instead of being refused for asking 2048."""
    from elasticmoe.config import AppArgs
    from elasticmoe.gateway.deployment import _max_model_len

    values = _values(name) if limit == "absent" else _values(name, limits={"maxModelLen": limit})
    args = AppArgs.model_validate(_serve_args(_rs(values)))
    assert ("max_model_len" in args.limits.model_fields_set) == (written is not None)
    if written is not None:
        assert args.limits.max_model_len == written
    else:  # what the gateway then serves for a 512-token model
        assert _max_model_len(args.limits, type("Spec", (), {"max_position_embeddings": 512})) == 512
