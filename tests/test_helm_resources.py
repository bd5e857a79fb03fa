"""The chart's pods against its Serve config: what each worker group's pods give `ray start` (KubeRay derives num-cpus,
memory and num-gpus from the Ray container's resources: tests/kuberay_rules.py) holds one replica of what the Serve
config places there (gateway_resources, shard_resources), for every values file, with and without directGrpc; values
where it does not fail the render, naming them."""

from __future__ import annotations

import re

import helm_python as helm
import pytest
import yaml

from tests.helm_util import _chart, _objects, _one, _render
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
