"""The chart's pods against its Serve config: what each worker group's pods give `ray start` (KubeRay derives num-cpus,
memory and num-gpus from the Ray container's resources: tests/kuberay_rules.py) holds one replica of what the Serve
config places there (gateway_resources, shard_resources), for every values file, with and without directGrpc; values
where it does not fail the render, naming them."""

from __future__ import annotations

import re

import helm_python as helm
import pytest
import yaml

from tests.helm_util import _chart, _objects, _one, _render, _start_shards
from tests.kuberay_rules import ray_resources, replica_fits
from tests.test_helm_values import VALUE_SETS, _merge, _values

DIRECT = {"directGrpc": {"enabled": True}}


def _full(values: dict) -> dict:
    """`values` over the chart's defaults, as Helm merges them."""
    return _merge(_chart().values, values)


def _direct(name: str) -> dict:
    """A values file with directGrpc on, its gateway pods sized as its worker pods (GPUs: as a gateway asks)."""
    values = _full(_values(name))
    group = {"gpus": int(values["gatewayResources"]["numGpus"]), "resources": values["workers"]["resources"]}
    return _merge(values, {**DIRECT, "gatewayGroup": group})


def _rs(values: dict) -> dict:
    return _one(_objects(_render(values)), "RayService")


def _placement(rs: dict) -> dict[str, list[str]]:
    """Replica kind -> the worker groups one of whose (empty) pods can hold one, as Ray places it."""
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    groups = {g["groupName"]: ray_resources(g) for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    return {kind: [name for name, pod in groups.items() if replica_fits(pod, args[f"{kind}_resources"])]
            for kind in ("gateway", "shard")}


@pytest.mark.parametrize("direct", [False, True], ids=["one-group", "direct-grpc"])
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_replica_fits_a_pod_of_its_group(name, direct):
    values = _direct(name) if direct else _full(_values(name))
    rs = _rs(values)
    where = _placement(rs)
    workers = values["workers"]["groupName"]
    assert workers in where["shard"], where
    assert (values["gatewayGroup"]["groupName"] if direct else workers) in where["gateway"], where


@pytest.mark.parametrize("values, message", [
    pytest.param(_merge(_values("gpu-production"), {**DIRECT, "gatewayGroup": {"gpus": 1}}),
                 "gatewayResources.numCpus (4) exceeds the CPUs one gatewayGroup pod gives Ray (2, from "
                 "gatewayGroup.resources.limits.cpu 2)", id="production-gateways-on-default-gateway-pods"),
    pytest.param(_values("default", shardResources={"numCpus": 6}),
                 "shardResources.numCpus (6) exceeds the CPUs one workers pod gives Ray (4, from "
                 "workers.resources.limits.cpu 4)", id="shard-cpus"),
    pytest.param(_values("gpu-production", gatewayResources={"memory": 200 << 30}),
                 "gatewayResources.memory (214748364800 bytes) exceeds the memory one workers pod gives Ray "
                 "(103079215104 bytes, from workers.resources.limits.memory 96Gi)", id="gateway-memory"),
    pytest.param(_values("default", workers={"resources": {"limits": None, "requests": {"cpu": "1500m"}}},
                         shardResources={"numCpus": 2.5}),
                 "shardResources.numCpus (2.5) exceeds the CPUs one workers pod gives Ray (2, from "
                 "workers.resources.requests.cpu 1500m, no limit)", id="cpu-request-without-limit"),
])
def test_a_replica_no_pod_of_its_group_holds_fails_render(values, message):
    """The deploy would wait for good: Ray never places the replica (the production values with directGrpc, the
    gateway group at its default size, rendered without a word before)."""
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(values)


@pytest.mark.parametrize("pod, replica, fits", [
    ({"resources": {"limits": None, "requests": {"cpu": "1500m"}}}, {"numCpus": 2}, True),  # a request rounds up
    ({"resources": {"limits": None, "requests": {"cpu": "1500m"}}}, {"numCpus": 2.01}, False),
    ({"resources": {"limits": {"cpu": "500m"}}}, {"numCpus": 1}, True),
    ({"rayStartParams": {"num-cpus": "8"}}, {"numCpus": 6}, True),  # Ray is told its CPUs: the container's not used
    ({"rayStartParams": {"num-cpus": "8"}}, {"numCpus": 9}, False),
    ({"resources": {"limits": {"memory": "1.5G"}}}, {"memory": 1_500_000_000}, True),
    ({"resources": {"limits": {"memory": "1.5G"}}}, {"memory": 1_500_000_001}, False),
    ({"resources": {"limits": {"memory": "1e9"}}}, {"memory": 10 ** 9 + 1}, False),
    ({"resources": {"limits": {"memory": None}, "requests": {"memory": "1Gi"}}}, {"memory": 64 << 30}, True),
    ({"resources": {"limits": None, "requests": None}}, {"numCpus": 64}, True),  # nothing said: Ray counts the node's
])
def test_the_renders_check_is_what_kuberay_gives_ray(pod, replica, fits):
    """The render fails exactly when KubeRay's derivation from the rendered worker pods (kuberay_rules.ray_resources)
    leaves no room for one shard (a memory limit left out, or no resources at all: Ray sizes the pod itself)."""
    rs = _rs(_values("default", workers=pod))
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    asks = {**args["shard_resources"], "num_cpus": replica.get("numCpus", 0.5), "memory": replica.get("memory")}
    assert replica_fits(ray_resources(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]), asks) is fits
    values = _values("default", workers=pod, shardResources=replica)
    if fits:
        _rs(values)
    else:
        with pytest.raises(helm.HelmError, match="shardResources"):
            _render(values)


# ----- GPUs with directGrpc: the gateways' are their own group's, not the workers'
def _fixed_direct(pods: int) -> dict:
    """The production values with directGrpc, no Ray autoscaler: `pods` worker pods of one GPU each."""
    workers = {"replicas": pods, "minReplicas": pods, "maxReplicas": pods}
    return _merge(_direct("gpu-production"), {"rayAutoscaler": {"enabled": False}, "workers": workers})


def test_direct_grpc_worker_pods_need_gpus_for_the_shards_only():
    """With directGrpc the gateways run on gatewayGroup's pods: 8 shards need 8 worker GPUs, not 8 + 2 (the render
    refused 8 worker pods for 8 shards, asking for 10 GPUs)."""
    values = _fixed_direct(8)
    rs = _rs(values)
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpus = {name: g["replicas"] * ray_resources(g)["GPU"] for name, g in groups.items()}
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    want = {"gpu": args["num_shards"] * args["shard_resources"]["num_gpus"],
            "gateways": args["num_gateways"] * args["gateway_resources"]["num_gpus"]}
    assert gpus == want == {"gpu": 8, "gateways": 2}
    with pytest.raises(helm.HelmError, match=re.escape("the replicas need 8 GPUs (shards x shardResources.numGpus) "
                                                       "but the worker group has 7 (7 pods x workers.gpus=1)")):
        _render(_fixed_direct(7))


def test_direct_grpc_gateways_may_want_more_gpus_than_a_worker_pod():
    """A gateway's GPUs are checked against gatewayGroup.gpus, not workers.gpus, when it runs there."""
    values = _merge(_direct("gpu-production"), {"gatewayResources": {"numGpus": 2}, "gatewayGroup": {"gpus": 2}})
    assert _placement(_rs(values))["gateway"] == ["gateways"]
    with pytest.raises(helm.HelmError, match=re.escape("gatewayResources.numGpus is 2 but gatewayGroup.gpus is 1")):
        _render(_merge(values, {"gatewayGroup": {"gpus": 1}}))


@pytest.mark.parametrize("direct, shards", [(False, 12), (True, 14)])
def test_a_new_cluster_at_the_current_scale_starts_the_shards_its_worker_pods_hold(direct, shards):
    """14 worker pods of one GPU hold 14 shards when the gateways run elsewhere (directGrpc), 12 beside 2 gateways."""
    values = _direct("gpu-production") if direct else _full(_values("gpu-production"))
    rs = _rs(_merge(values, {"upgrade": {"currentWorkerReplicas": 14}}))
    workers = next(g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert workers["replicas"] == 14
    assert _start_shards(rs) == shards
