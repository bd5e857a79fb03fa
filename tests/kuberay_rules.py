"""The KubeRay operator's admission rules for a RayService that its CRD schema cannot express, written for the tests
from a reading of ray-operator/controllers/ray/utils/validation.go and common/service.go at the commit of
../shared/kuberay-crds (feeaf72fa): `rayservice_errors(rs)` lists what the operator would refuse, [] if nothing;
also what a group's pods give `ray start` (`ray_resources`) and the readiness probe KubeRay gives a Ray container
(`readiness_probe`, common/pod.go), what of a RayService decides a new RayCluster (`cluster_hash_view`), and what
Serve then does with a new serveConfigV2 on the cluster KubeRay keeps (`serve_update`)."""

from __future__ import annotations

import copy
import math
import re

MAX_RAYSERVICE_NAME = 53 - 6  # RayCluster names <= 53 (63 - len("-serve-svc")), minus the RayService suffix
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                             r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_GO_DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"


def _env(container: dict, name: str) -> dict | None:
    return next((e for e in container.get("env", []) if e["name"] == name), None)


def _v2(cluster: dict) -> bool:
    """Autoscaler v2: autoscalerOptions.version v2, or (KubeRay < 1.4 style) the head env var set to 1/true."""
    if (cluster.get("autoscalerOptions") or {}).get("version") == "v2":
        return True
    env = _env(cluster["headGroupSpec"]["template"]["spec"]["containers"][0], AUTOSCALER_V2_ENV)
    return env is not None and env.get("value") in ("1", "true")


def _initializing_timeout(value: str) -> str | None:
    if _GO_DURATION.fullmatch(value):
        parts = re.findall(r"([0-9]+(\.[0-9]+)?)(ns|us|µs|ms|s|m|h)", value)
        seconds = sum(float(n) * _GO_UNIT_S[u] for n, _, u in parts)
        return None if seconds > 0 else f"annotation ray.io/initializing-timeout must be a positive duration: {value}"
    if re.fullmatch(r"[+-]?[0-9]+", value):
        return None if int(value) > 0 else f"annotation ray.io/initializing-timeout must be a positive integer: {value}"
    return f"annotation ray.io/initializing-timeout has invalid format: {value}"


def _metadata_errors(meta: dict) -> list[str]:
    name, errors = meta["name"], []
    if len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"RayService name should be no more than {MAX_RAYSERVICE_NAME} characters: {name}")
    if not _DNS1035.fullmatch(name):
        errors.append(f"RayService name should be a valid DNS1035 label: {name}")
    timeout = (meta.get("annotations") or {}).get("ray.io/initializing-timeout")
    if timeout and (err := _initializing_timeout(timeout)):
        errors.append(err)
    return errors


def _group_errors(name: str, group: dict) -> list[str]:
    errors, params = [], group.get("rayStartParams") or {}
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        errors.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group")
    if "labels" in params:
        errors.append(f"rayStartParams['labels'] is not supported for {name} group")
    for key, value in (group.get("labels") or {}).items():
        if not _QUALIFIED_NAME.fullmatch(key) or not _LABEL_VALUE.fullmatch(value) or len(value) > 63:
            errors.append(f"invalid label {key}={value} in {name} group")
    if not group["template"]["spec"].get("containers"):
        errors.append(f"{name} group should have at least one container")
    return errors


def _cluster_errors(cluster: dict, annotations: dict) -> list[str]:
    errors = _group_errors("Head", cluster["headGroupSpec"])
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in cluster.get("workerGroupSpecs", []):
        name = g["groupName"]
        errors += _group_errors(name, g)
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
        if g.get("idleTimeoutSeconds") is not None and not _v2(cluster):
            errors.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled")
        if g.get("priority") and not _v2(cluster):
            errors.append(f"worker group {name}: priority is set, but autoscaler v2 is not enabled")
        if g.get("suspend") and autoscaling:
            errors.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
        restart = g["template"]["spec"].get("restartPolicy")
        if autoscaling and _v2(cluster) and restart not in (None, "", "Never"):
            errors.append(f"restartPolicy for worker group {name} should be Never or unset when using autoscaler V2")
    env_v2 = _env(head, AUTOSCALER_V2_ENV)
    if not autoscaling and env_v2 is not None and env_v2.get("value") in ("1", "true"):
        errors.append(f"{AUTOSCALER_V2_ENV} cannot be set when enableInTreeAutoscaling is false")
    if autoscaling and (cluster.get("autoscalerOptions") or {}).get("version") and env_v2 is not None:
        errors.append(f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set")
    ft = cluster.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errors.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    if ft is None and annotations.get("ray.io/ft-enabled", "").lower() != "true" and _env(head, "RAY_REDIS_ADDRESS"):
        errors.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but "
                      "GcsFaultToleranceOptions is not set")
    if ft is not None:
        if cluster["headGroupSpec"].get("rayStartParams", {}).get("redis-password"):
            errors.append("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled")
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if _env(head, var):
                errors.append(f"cannot set `{var}` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append("cannot set ray.io/external-storage-namespace when GcsFaultToleranceOptions is enabled")
        if ft.get("backend", "redis") == "redis" and ft.get("storage") is not None:
            errors.append("cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'")
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") == "token":
        version = tuple(int(x) for x in re.findall(r"\d+", cluster.get("rayVersion", ""))[:3])
        if not version or version < (2, 52, 0):
            errors.append("authOptions.mode is 'token' but the minimum Ray version is 2.52.0")
    if auth.get("enableK8sTokenAuth"):
        errors.append("K8s token auth mode is currently not supported for RayService")
    return errors


def _serve_port_errors(rs: dict) -> list[str]:
    """common/service.go: the serve Service carries head container ports named `serve` or `serve-*`."""
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    names = [p.get("name", "") for p in head.get("ports", [])]
    serving = [n for n in names if n == "serve" or n.startswith("serve-")]
    if not serving and not rs["spec"].get("serveService"):
        return ["Please specify a port named 'serve' (or with the prefix 'serve-') in the Ray head container"]
    return []


def _upgrade_errors(rs: dict) -> list[str]:
    spec, errors = rs["spec"], []
    strategy = spec.get("upgradeStrategy") or {}
    kind = strategy.get("type")
    if kind is not None and kind not in UPGRADE_TYPES:
        errors.append(f"Spec.UpgradeStrategy.Type value {kind} is invalid")
    delay = spec.get("rayClusterDeletionDelaySeconds")
    if delay is not None and delay < 0:
        errors.append(f"Spec.RayClusterDeletionDelaySeconds should be a non-negative integer, got {delay}")
    if kind == "NewClusterWithIncrementalUpgrade":
        opts = strategy.get("clusterUpgradeOptions")
        if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
            errors.append("Ray Autoscaler is required for NewClusterWithIncrementalUpgrade")
        if opts is None:
            return errors + ["ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"]
        surge = opts.get("maxSurgePercent", 100)
        step, interval = opts.get("stepSizePercent"), opts.get("intervalSeconds")
        if not 0 <= surge <= 100:
            errors.append("maxSurgePercent must be between 0 and 100")
        if step is None or not 0 <= step <= 100:
            errors.append("stepSizePercent must be between 0 and 100")
        elif step > surge:
            errors.append("stepSizePercent must be less than or equal to maxSurgePercent")
        if interval is None or interval <= 0:
            errors.append("intervalSeconds must be greater than 0")
        if not opts.get("gatewayClassName"):
            errors.append("gatewayClassName is required for NewClusterWithIncrementalUpgrade")
    head_svc = spec["rayClusterConfig"]["headGroupSpec"].get("headService") or {}
    if (head_svc.get("metadata") or {}).get("name"):
        errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
    return errors


def rayservice_errors(rs: dict) -> list[str]:
    """Every rule above that a rendered RayService breaks."""
    annotations = rs["metadata"].get("annotations") or {}
    return (_metadata_errors(rs["metadata"]) + _cluster_errors(rs["spec"]["rayClusterConfig"], annotations)
            + _serve_port_errors(rs) + _upgrade_errors(rs))


_QUANTITY = re.compile(r"([0-9]*\.?[0-9]*(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           **{s: 1024 ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}
GPU_KEY = "nvidia.com/gpu"


def quantity(value) -> float:
    """A Kubernetes quantity (8Gi, 500m, 2, 1e9) as a number."""
    number, suffix = _QUANTITY.fullmatch(str(value)).groups()
    return float(number) * _SUFFIX[suffix]


def ray_resources(group: dict) -> dict[str, float]:
    """The resources a pod of the group (a headGroupSpec or workerGroupSpecs entry) gives `ray start`
    (generateRayStartCommand, addWellKnownAcceleratorResources, updateRayStartParamsResources): num-cpus from
    rayStartParams, else the Ray container's CPU limit, else its request, rounded up; memory from rayStartParams, else
    the memory limit; num-gpus from rayStartParams, else nvidia.com/gpu; the group's `resources` as custom resources.
    A resource left out is one Ray sizes itself."""
    params = group.get("rayStartParams") or {}
    res = group["template"]["spec"]["containers"][0].get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    out: dict[str, float] = {}
    cpu = next((quantity(r["cpu"]) for r in (limits, requests) if quantity(r.get("cpu", 0))), None)
    if "num-cpus" in params or cpu is not None:
        out["CPU"] = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(cpu)
    if "memory" in params or quantity(limits.get("memory", 0)):
        out["memory"] = float(params["memory"]) if "memory" in params else math.ceil(quantity(limits["memory"]))
    out["GPU"] = float(params.get("num-gpus", math.ceil(quantity(limits.get(GPU_KEY, 0)))))
    out.update({k: quantity(v) for k, v in (group.get("resources") or {}).items()})
    return out


def replica_fits(pod: dict[str, float], options: dict) -> bool:
    """A replica with these Ray options (AppArgs' gateway_resources / shard_resources, as in serveConfigV2) fits an
    empty pod that gives Ray `pod`."""
    asks = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0),
            "memory": options.get("memory") or 0, **(options.get("resources") or {})}
    if options.get("accelerator_type"):
        asks[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return all(amount <= pod.get(name, math.inf if name in ("CPU", "memory") else 0) for name, amount in asks.items()
               if amount)


def readiness_probe(container: dict, node_type: str, params: dict, ray_version: str) -> dict:
    """The readiness probe a RayService's Ray container runs (initLivenessAndReadinessProbe): the container's own, or
    KubeRay's: the raylet through the dashboard agent (rayStartParams' dashboard-agent-listen-port, else 52365), the
    head's GCS through the dashboard (Ray >= 2.53: one HTTP check, /api/healthz on the agent port), and on a worker
    the Serve proxy on the container port named `serve`, else 8000."""
    if container.get("readinessProbe"):
        return container["readinessProbe"]
    agent = int(params.get("dashboard-agent-listen-port", 52365))
    wget = "wget --tries 1 -T {} -q -O- http://localhost:{}/{} | grep success"
    if node_type == "head":
        if tuple(int(x) for x in re.findall(r"\d+", ray_version)[:3]) >= (2, 53, 0):
            return {"httpGet": {"path": "/api/healthz", "port": agent}}
        commands = [wget.format(2, agent, "api/local_raylet_healthz"),
                    wget.format(10, int(params.get("dashboard-port", 8265)), "api/gcs_healthz")]
        return {"exec": {"command": ["bash", "-c", " && ".join(commands)]}}
    serve = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == "serve"), 8000)
    commands = [wget.format(2, agent, "api/local_raylet_healthz"), wget.format(10, serve, "-/healthz")]
    return {"exec": {"command": ["bash", "-c", " && ".join(commands)]}}


def probe_ports(probe: dict) -> set[int]:
    """The local ports a probe connects to (httpGet / tcpSocket ports, localhost URLs and /dev/tcp in an exec)."""
    ports = {int(probe[k]["port"]) for k in ("httpGet", "tcpSocket") if k in probe}
    script = " ".join((probe.get("exec") or {}).get("command", []))
    ports |= {int(p) for p in re.findall(r"http://(?:localhost|127\.0\.0\.1):(\d+)/", script)}
    return ports | {int(p) for p in re.findall(r"/dev/tcp/(?:localhost|127\.0\.0\.1)/(\d+)", script)}


def cluster_hash_view(rs: dict) -> dict:
    """The part of rayClusterConfig whose change makes KubeRay prepare a new RayCluster (rayservice_controller.go
    shouldPrepareNewCluster, utils.GenerateHashWithoutReplicasAndWorkersToDelete): all but suspend, the worker groups'
    replicas / minReplicas / maxReplicas / workersToDelete, the pods' tolerations and scheduling gates. Equal views:
    KubeRay keeps the cluster and only redeploys a changed serveConfigV2 on it."""
    spec = copy.deepcopy(rs["spec"]["rayClusterConfig"])
    spec.pop("suspend", None)
    spec.pop("upgradeStrategy", None)
    for group in [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", []):
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key, None)
        (group.get("scaleStrategy") or {}).pop("workersToDelete", None)
        for key in ("tolerations", "schedulingGates"):
            group["template"]["spec"].pop(key, None)
    return spec


def _serve_app(rs: dict) -> dict:
    import yaml

    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app


def serve_update(old: dict, new: dict) -> str | dict[str, dict[str, str]] | None:
    """What Serve does on the running RayCluster when a RayService `old` becomes `new` and KubeRay keeps the cluster
    (equal cluster_hash_view), by Ray's own rules: None when serveConfigV2 is the same text (KubeRay submits a config
    only when it differs from the one it last submitted: checkIfNeedSubmitServeApplications); "redeploy" when the
    application's code version changes (serve/_private/deploy_utils.get_app_code_version: import_path, runtime_env,
    args, the deployments' autoscaling policies): Serve builds the application again and replaces every replica of
    every deployment. Else {deployment: {option: kind}} for each changed option of the config's `deployments`:
    "in place" for a DeploymentConfig option Serve applies to the running replicas (all but the HeavyWeight ones:
    user_config reaches reconfigure()), "restart" for the others (ray_actor_options, placement groups, ...), "count
    reset" for an autoscaling_config with initial_replicas (AutoscalingState.register: a changed deployment config sets
    the target replica count to it, whatever the count was)."""
    from ray.serve._private.config import DeploymentConfig
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    if old["spec"]["serveConfigV2"] == new["spec"]["serveConfigV2"]:
        return None
    apps = [_serve_app(rs) for rs in (old, new)]
    if len({get_app_code_version(ServeApplicationSchema.model_validate(a)) for a in apps}) > 1:
        return "redeploy"
    before, after = ({d["name"]: d for d in a.get("deployments", [])} for a in apps)
    changes: dict[str, dict[str, str]] = {}
    for name in before.keys() | after.keys():
        was, now = before.get(name, {}), after.get(name, {})
        for option in (was.keys() | now.keys()) - {"name"}:
            if was.get(option) == now.get(option):
                continue
            field = DeploymentConfig.model_fields.get(option)
            update = ((field.json_schema_extra or {}) if field else {}).get("update_type")
            kind = "in place" if update is not None and update.value != "HeavyWeight" else "restart"
            if option == "autoscaling_config" and (now.get(option) or {}).get("initial_replicas") is not None:
                kind = "count reset"
            changes.setdefault(name, {})[option] = kind
    return changes
