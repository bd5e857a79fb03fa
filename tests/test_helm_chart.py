"""The Helm chart (helm/elasticmoe) rendered and linted with Helm's own engine (helm-python-sdk), every
rendered RayService validated against KubeRay's CRD in ../shared/kuberay-crds/, values.schema.json checked."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import helm_python as helm  # helm-python-sdk (dev dependency): Helm's Go SDK as a shared library
import pytest
import yaml

from elasticmoe.config import ScaleConfig
from tests.helm_util import (_chart, _check_rayservice, _containers, _crd_validator, _deployments, _objects, _one,
                             _port_ranges, _prod_values, _render)
from tests.test_deploy_configs import CHART_DIR, NAMESPACE, RELEASE


@pytest.fixture(scope="module")
def default_objects():
    return _objects(_render())


@pytest.fixture(scope="module")
def prod_objects():
    return _objects(_render(_prod_values()))


def test_helm_library_is_bundled():
    """helm-python-sdk needs no helm binary and downloads nothing: Helm's Go SDK is in the wheel."""
    assert Path(helm.library_path).is_file()
    assert Path(helm.__file__).parent in Path(helm.library_path).parents
    assert helm.helm_sdk_version().startswith("v")


def test_chart_metadata():
    meta = _chart().metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "elasticmoe"
    assert meta.get("kubeVersion")
    readme = (CHART_DIR / "README.md").read_text()
    assert "kuberay-operator" in readme and "upgradeStrategy" in readme
    # serve-* ports on the serve Service and autoscaler v2 options: KubeRay >= 1.6, said in both places.
    assert meta["annotations"]["elasticmoe.io/requires"].startswith("kuberay-operator >= 1.6")
    assert "KubeRay 1.6 or newer" in readme
    assert _chart().schema["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("values_name", ["default", "gpu-production"])
def test_chart_lints_clean(values_name):
    values = None if values_name == "default" else _prod_values()
    report = helm.lint(str(CHART_DIR), values, kube_version="v1.30.0", namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # no warnings either


def test_default_values_render(default_objects):
    rs = _one(default_objects, "RayService")
    args = _check_rayservice(rs)
    values = _chart().values
    assert args.model == values["model"]["path"] == "tiny:mixtral"
    assert (args.num_shards, args.num_gateways, args.device) == (2, 1, "cpu")
    assert args.autoscaling is None
    kinds = sorted(o["kind"] for o in default_objects)
    assert kinds == ["NetworkPolicy", "PodDisruptionBudget", "RayService", "Secret", "Service"]  # Secret: internal TLS


def test_production_values_render(prod_objects):
    rs = _one(prod_objects, "RayService")
    args = _check_rayservice(rs)
    prod = _prod_values()
    assert args.model == prod["model"]["path"]
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert (args.num_shards, args.num_gateways) == (prod["shards"], prod["gateways"])
    # the operator's bounds: options Serve applies in place (tests/test_helm_upgrade.py); the args' are the widest
    assert (args.autoscaling.min_shards, args.autoscaling.max_shards) == (1, 1024)
    scale = ScaleConfig.model_validate(_deployments(rs)["Controller"]["user_config"]).within(args)
    serve = _deployments(rs)["ExpertShard"]["autoscaling_config"]
    bounds = (prod["autoscaling"]["minShards"], prod["autoscaling"]["maxShards"])
    assert (scale.min_shards, scale.max_shards) == (serve["min_replicas"], serve["max_replicas"]) == bounds
    assert scale.start_shards == prod["shards"]
    assert args.shard_resources.num_gpus == 1 and args.limits.max_model_len == prod["limits"]["maxModelLen"]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == prod["workers"]["gpus"] == 1
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    # A model change rolls out a new cluster in production.
    assert "elasticmoe.io/model-sha256" in cluster["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert rs["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    kinds = {o["kind"] for o in prod_objects}
    assert {"RayService", "Service", "NetworkPolicy", "ServiceMonitor", "ConfigMap"} <= kinds


@pytest.mark.parametrize("autoscaling, cooldown_s, deadline_s", [
    ({}, 30, 600),  # the chart's defaults: the app's
    ({"scaleCooldownSeconds": 300, "startDeadlineSeconds": 1800}, 300, 1800),
    ({"scaleCooldownSeconds": 0, "startDeadlineSeconds": 90.5}, 0, 90.5),
    ({"startDeadlineSeconds": None}, 30, None),  # null: written as null (wait for good), not the app's 600 s
])
def test_autoscaling_timers_reach_the_rayservice(autoscaling, cooldown_s, deadline_s):
    """autoscaling.scaleCooldownSeconds and startDeadlineSeconds are the app's autoscaling.scale_cooldown_s and
    start_deadline_s in the rendered RayService's Serve config, with the production values on top too."""
    for base in ({"autoscaling": {"enabled": True}}, _prod_values()):
        values = copy.deepcopy(base)
        values["autoscaling"].update(autoscaling)
        rs = _one(_objects(_render(values)), "RayService")
        auto = _check_rayservice(rs).autoscaling
        assert (auto.scale_cooldown_s, auto.start_deadline_s) == (cooldown_s, deadline_s)
        written = _serve_autoscaling(rs)
        assert written["scale_cooldown_s"] == cooldown_s and written["start_deadline_s"] == deadline_s


def _serve_autoscaling(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["autoscaling"]


@pytest.mark.parametrize("which", ["default", "gpu-production"])
def test_pods_run_as_non_root(which, default_objects, prod_objects):
    rs = _one(default_objects if which == "default" else prod_objects, "RayService")
    for spec, container in _containers(rs):
        assert spec["securityContext"]["runAsNonRoot"] is True
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
    autoscaler = rs["spec"]["rayClusterConfig"].get("autoscalerOptions")
    if autoscaler:
        assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False


def test_crd_validation_catches_mistakes(default_objects):
    """The CRD check is not vacuous: a typo'd field or a wrong type is rejected."""
    validator = _crd_validator("ray.io_rayservices.yaml")
    rs = copy.deepcopy(_one(default_objects, "RayService"))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert not validator.is_valid(rs)
    rs = copy.deepcopy(_one(default_objects, "RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert not validator.is_valid(rs)


def test_services_expose_grpc_and_http(default_objects):
    """HTTP and gRPC both go through KubeRay's serve Service, which follows the serving cluster (KubeRay >= 1.6
    carries every head port named serve / serve-*); no chart Service selects pods on its own."""
    rs = _one(default_objects, "RayService")
    serve_svc = rs["spec"]["serveService"]
    assert {p["name"]: p["port"] for p in serve_svc["spec"]["ports"]} == {"serve": 8000, "serve-grpc": 9000}
    assert {p["name"]: p["appProtocol"] for p in serve_svc["spec"]["ports"]}["serve-grpc"] == "kubernetes.io/h2c"
    for _, container in _containers(rs):  # head and workers: Serve proxies on both (proxy_location EveryNode)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000
    services = {o["metadata"]["name"]: o for o in default_objects if o["kind"] == "Service"}
    assert list(services) == [f"{RELEASE}-elasticmoe-metrics"]  # the old -grpc Service also hit pending clusters
    metrics = services[f"{RELEASE}-elasticmoe-metrics"]
    pod_labels = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert metrics["spec"]["selector"].items() <= pod_labels.items()
    # KubeRay selects its own Services on app.kubernetes.io/name=kuberay: never override it.
    assert "app.kubernetes.io/name" not in pod_labels


@pytest.mark.parametrize("which", ["default", "gpu-production"])
def test_network_policy_fences_expert_ports(which, default_objects, prod_objects):
    objs = default_objects if which == "default" else prod_objects
    values = _chart().values if which == "default" else _prod_values()
    policy = _one(objs, "NetworkPolicy")
    rs = _one(objs, "RayService")
    own = policy["spec"]["podSelector"]["matchLabels"]
    for spec_labels in (rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"],
                        rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]):
        assert own.items() <= spec_labels.items(), "the policy must select every Ray pod of the release"
    lo, hi = values["expertPort"]["start"], values["expertPort"]["end"]
    serving_open = False
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [])
        internal = peers and all(p.get("podSelector", {}).get("matchLabels") == own and len(p) == 1 for p in peers)
        if internal:
            continue
        ranges = _port_ranges(rule)
        assert ranges, f"a rule open to other peers must name its ports: {rule}"
        assert all(b < lo or a > hi for a, b in ranges), f"expert ports {lo}-{hi} reachable from outside: {rule}"
        serving_open |= {(8000, 8000), (9000, 9000)} <= set(ranges)
    assert serving_open
    assert any(_port_ranges(r) == [(lo, hi)] for r in policy["spec"]["ingress"])
    env = {e["name"]: e.get("value") for _, c in _containers(rs) for e in c["env"]}
    assert env["ELASTICMOE_EXPERT_PORT_RANGE"] == f"{lo}-{hi}"
    assert env["ELASTICMOE_EXPERT_HOST"] == "node_ip"  # gateways in other pods call the shards


def test_kuberay_operator_reaches_dashboard_and_proxy(prod_objects):
    """Even with restricted clients, the operator can deploy (8265) and health-check the proxy (8000)."""
    policy = _one(prod_objects, "NetworkPolicy")
    operator_peers = _prod_values()["networkPolicy"]["operatorFrom"]
    rules = [r for r in policy["spec"]["ingress"] if r.get("from") == operator_peers]
    assert rules and {(8265, 8265), (8000, 8000)} <= set(_port_ranges(rules[0]))


def test_serving_ports_open_to_the_release_namespace_by_default(default_objects):
    policy = _one(default_objects, "NetworkPolicy")
    rule = next(r for r in policy["spec"]["ingress"] if (9000, 9000) in _port_ranges(r))
    assert rule["from"] == [{"podSelector": {}}]  # pods of the policy's own namespace, nobody else


@pytest.mark.parametrize("enabled", [False, True])
def test_grafana_dashboard_only_when_enabled(enabled):
    objs = _objects(_render({"grafana": {"dashboard": {"enabled": enabled}}}))
    maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert [o for o in objs if o["kind"] == "ServiceMonitor"] == []
    if not enabled:
        assert maps == []
        return
    (cm,) = maps
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = (CHART_DIR / "dashboards" / "elasticmoe.json").read_text()
    assert json.loads(cm["data"]["elasticmoe.json"]) == json.loads(dashboard)


def test_service_monitor_when_enabled():
    objs = _objects(_render({"serviceMonitor": {"enabled": True}}))
    sm = _one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    metrics_svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == metrics_svc["spec"]["ports"][0]["name"]


def test_dashboard_json():
    dash = json.loads((CHART_DIR / "dashboards" / "elasticmoe.json").read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    text = json.dumps(dash).lower()
    assert "todo" not in text and "placeholder" not in text
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(?:ray_)?elasticmoe_[a-z0-9_]+", e)}
    assert used and all(m.startswith("ray_elasticmoe_") for m in used)  # Ray prefixes custom metrics
    for metric in ["requests_total", "ttft_seconds_bucket", "tpot_seconds_bucket", "running_seqs", "queued_seqs",
                   "kv_cache_usage", "expert_tokens_total"]:
        assert f"ray_elasticmoe_{metric}" in used, metric
    heatmaps = [p for p in dash["panels"] if p["type"] == "heatmap"]
    expert = [p for p in heatmaps if any("expert_tokens_total" in t["expr"] and "by (expert)" in t["expr"]
                                         and "$layer" in t["expr"] for t in p["targets"])]
    assert expert, "no expert-load heatmap"
    assert any("ttft_seconds_bucket" in t["expr"] for p in heatmaps for t in p["targets"])
    assert any("tpot_seconds_bucket" in t["expr"] for p in heatmaps for t in p["targets"])
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "layer"}


@pytest.mark.parametrize("bad", [
    pytest.param({"shards": "eight"}, id="wrong-type"),
    pytest.param({"shards": 0}, id="shards-below-1"),
    pytest.param({"gateways": 1.5}, id="fractional-gateways"),
    pytest.param({"model": {"dtype": "int8"}}, id="unknown-dtype"),
    pytest.param({"model": {"device": "tpu"}}, id="unknown-device"),
    pytest.param({"workers": {"resources": {"limits": {"cpu": "-2"}}}}, id="negative-resource"),
    pytest.param({"shardResources": {"numGpus": -1}}, id="negative-ray-gpus"),
    pytest.param({"limits": {"maxQueue": -1}}, id="negative-queue"),
    pytest.param({"autoscaling": {"targetUtilization": 1.5}}, id="utilization-over-1"),
    pytest.param({"autoscaling": {"scaleCooldownSeconds": -1}}, id="negative-cool-down"),
    pytest.param({"autoscaling": {"startDeadlineSeconds": 0}}, id="zero-start-deadline"),
    pytest.param({"autoscaling": {"startDeadlineSeconds": "10m"}}, id="start-deadline-not-a-number"),
    pytest.param({"autoscaling": {"startDeadlineSeconds": 1e10}}, id="start-deadline-past-a-day"),
    pytest.param({"autoscaling": {"maxShards": 1025}}, id="max-shards-past-the-apps-1024"),
    pytest.param({"limits": {"expertTimeoutSeconds": 1e10}}, id="expert-timeout-past-a-day"),
    pytest.param({"model": {"servedName": "moe\nERROR forged"}}, id="served-name-with-a-newline"),
    pytest.param({"model": {"servedName": "moe\u202e"}}, id="served-name-with-a-bidi-override"),
    pytest.param({"expertPort": {"start": 80}}, id="privileged-expert-port"),
    pytest.param({"securityContext": {"runAsNonRoot": False}}, id="root"),
    pytest.param({"shardz": 3}, id="unknown-key"),
])
def test_schema_rejects_bad_values(bad):
    with pytest.raises(helm.HelmValuesError):
        _chart().validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        _render(bad)
    assert helm.lint(str(CHART_DIR), bad)["errors"], "lint must report the bad value"


@pytest.mark.parametrize("bad, message", [
    ({"autoscaling": {"enabled": True, "minShards": 6, "maxShards": 4}}, "minShards"),
    ({"autoscaling": {"enabled": True, "minShards": 3, "maxShards": 8}}, "shards (2)"),
    ({"model": {"device": "cuda"}}, "workers.gpus is 0"),
    ({"expertPort": {"start": 8990, "end": 9010}}, "overlaps port 9000"),
    ({"workers": {"replicas": 3, "maxReplicas": 2}}, "minReplicas <= replicas <= maxReplicas"),
    ({"modelCache": {"type": "existingClaim"}}, "existingClaim"),
    ({"model": {"device": "cuda"}, "workers": {"gpus": 1}, "shardResources": {"numGpus": 1},
      "gatewayResources": {"numGpus": 1}}, "need 3 GPUs"),
    ({"serve": {"grpcPort": 8080}}, "serve.grpcPort 8080"),
    ({"serve": {"httpPort": 8265}}, "serve.httpPort 8265"),
    ({"serve": {"grpcPort": 6379}}, "serve.grpcPort 6379"),
    ({"expertPort": {"start": 20100, "end": 20100}}, "expertPort 20100-20100"),
    ({"shards": 4, "expertPort": {"start": 20100, "end": 20106}}, "expertPort 20100-20106"),
    ({"autoscaling": {"enabled": True, "maxShards": 8}, "expertPort": {"start": 20100, "end": 20109}},
     "expertPort 20100-20109"),
])
def test_semantic_checks_fail_render(bad, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(bad)


def test_expert_port_range_sized_to_the_shards_a_pod_holds():
    """Each expert shard binds two ports of expertPort (gRPC server, frame listener): a range holding exactly that
    for the shards one worker pod can run renders."""
    _check_rayservice(_one(_objects(_render({"shards": 4, "expertPort": {"start": 20100, "end": 20107}})),
                           "RayService"))
    gpu = {"model": {"device": "cuda"}, "workers": {"gpus": 2, "replicas": 4, "minReplicas": 4, "maxReplicas": 4},
           "shards": 6, "shardResources": {"numGpus": 1}, "gatewayResources": {"numGpus": 1},
           "expertPort": {"start": 20100, "end": 20103}}  # at most 2 shards (2 GPUs) a pod: 4 ports suffice
    _check_rayservice(_one(_objects(_render(gpu)), "RayService"))


def test_model_cache_volume_kinds():
    def volume(values):
        rs = _one(_objects(_render(values)), "RayService")
        vols = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
        return next(v for v in vols if v["name"] == "model-cache")
    objs = _objects(_render({"modelCache": {"type": "pvc"}}))
    pvc = _one(objs, "PersistentVolumeClaim")
    assert volume({"modelCache": {"type": "pvc"}})["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert volume({"modelCache": {"type": "existingClaim", "existingClaim": "weights"}})[
        "persistentVolumeClaim"]["claimName"] == "weights"
    assert volume({"modelCache": {"type": "hostPath"}})["hostPath"]["path"]
    rs = _one(_objects(_render({"modelCache": {"mountPath": "/weights"}})), "RayService")
    for _, c in _containers(rs):
        assert {"name": "HF_HOME", "value": "/weights"} in c["env"]
        assert {"name": "model-cache", "mountPath": "/weights", "readOnly": False} in c["volumeMounts"]


def test_model_hash_tracks_the_model_only():
    """A new model or revision rolls out a new cluster; a limits change stays an in-place Serve update."""
    def annotation(path="org/a", revision="main", max_num_seqs=64):
        values = _prod_values()
        values["model"].update(path=path, revision=revision)
        values["limits"]["maxNumSeqs"] = max_num_seqs
        rs = _one(_objects(_render(values)), "RayService")
        return rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"][
            "elasticmoe.io/model-sha256"]
    base = annotation()
    assert annotation(path="org/b") != base and annotation(revision="c" * 40) != base
    assert annotation(max_num_seqs=32) == base


def test_incremental_upgrade_renders_valid_rayservice():
    values = {"upgrade": {"strategy": "NewClusterWithIncrementalUpgrade",
                          "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 25,
                                                    "intervalSeconds": 60, "maxSurgePercent": 25}},
              "rayAutoscaler": {"enabled": True}, "rayAuth": {"mode": "token"}}
    rs = _one(_objects(_render(values)), "RayService")
    _check_rayservice(rs)
    assert rs["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"] == "istio"
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_notes_explain_how_to_call():
    notes = _render()["elasticmoe/templates/NOTES.txt"]
    assert "port-forward" in notes
    assert "elasticmoe generate" in notes and "--address 127.0.0.1:9000" in notes
    assert "/v1/completions" in notes
