"""The chart's directGrpc: the gateways in a worker group of their own (one a pod, by a custom Ray resource each
pod declares and each gateway asks for), their direct gRPC port behind a Service that reaches only those pods, the
NetworkPolicy admitting it; rendered with Helm's engine, held to KubeRay's CRD, its operator's rules and AppArgs."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.conftest import GATEWAY_RESOURCE
from tests.kuberay_rules import rayservice_errors
from tests.helm_util import _check_rayservice, _objects, _one, _render
from tests.test_helm_values import _serve_args, _values

ON = {"directGrpc": {"enabled": True}}


def _groups(rs: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def _direct_service(objs: list[dict]) -> dict:
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-direct-grpc")]
    return svc


def test_off_by_default_one_worker_group_and_no_port():
    objs = _objects(_render())
    rs = _one(objs, "RayService")
    assert list(_groups(rs)) == ["workers"] and "direct_grpc" not in _serve_args(rs)
    assert "resources" not in _serve_args(rs)["gateway_resources"]
    assert not [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-direct-grpc")]


def test_gateways_get_their_own_group_and_a_service_reaching_only_them():
    objs = _objects(_render(_values("default", **ON)))
    rs = _one(objs, "RayService")
    args = _check_rayservice(rs)  # KubeRay's CRD, Serve's schema, AppArgs
    assert rayservice_errors(rs) == []
    assert args.direct_grpc.port == 9100 and args.direct_grpc.host == "0.0.0.0"
    assert dict(args.gateway_resources.resources) == {GATEWAY_RESOURCE: 1.0}  # one gateway a pod
    assert args.num_gateways == 1
    groups = _groups(rs)
    gw, workers = groups["gateways"], groups["workers"]
    assert gw["resources"] == {GATEWAY_RESOURCE: "1"} and "resources" not in workers
    assert gw["replicas"] == gw["minReplicas"] == gw["maxReplicas"] == args.num_gateways
    port = {p["name"]: p["containerPort"] for p in _container(gw)["ports"]}
    assert port["direct-grpc"] == 9100 and "direct-grpc" not in {p["name"] for p in _container(workers)["ports"]}
    (probe,) = _container(gw)["readinessProbe"]["exec"]["command"][2:]  # bash -c <probe>
    assert [c.strip() for c in probe.split("&&")] == [  # KubeRay's raylet and proxy checks, then the port
        "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success",
        "wget --tries 1 -T 2 -q -O- http://localhost:8000/-/healthz | grep success", ": < /dev/tcp/127.0.0.1/9100"]
    assert "readinessProbe" not in _container(workers)
    # the gateway pods run as the workers do: same env, volumes, drain
    assert _container(gw)["env"] == _container(workers)["env"]
    assert gw["template"]["spec"]["volumes"] == workers["template"]["spec"]["volumes"]
    assert _container(gw)["lifecycle"] == _container(workers)["lifecycle"]
    svc = _direct_service(objs)
    assert svc["metadata"]["name"] == f"{rs['metadata']['name']}-direct-grpc"
    sel = svc["spec"]["selector"]
    assert sel.items() <= gw["template"]["metadata"]["labels"].items()
    assert not sel.items() <= workers["template"]["metadata"]["labels"].items()
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not sel.items() <= head.items()
    assert svc["spec"]["ports"] == [{"name": "direct-grpc", "port": 9100, "targetPort": "direct-grpc",
                                     "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}]
    clients = [r for r in _one(objs, "NetworkPolicy")["spec"]["ingress"]
               if {"port": 9000, "protocol": "TCP"} in r.get("ports", [])]
    assert len(clients) == 1 and {"port": 9100, "protocol": "TCP"} in clients[0]["ports"]


def test_gpu_gateways_get_gpus_and_their_own_accelerator():
    pods = _values("gpu-production")["workers"]["resources"]  # room for a gateway's 4 CPUs and 32 GiB
    values = _values("gpu-production", gatewayGroup={"gpus": 1, "resources": pods},
                     gatewayResources={"acceleratorType": "L40S"}, **ON)
    rs = _one(_objects(_render(values)), "RayService")
    args = _check_rayservice(rs)
    assert rayservice_errors(rs) == []
    groups = _groups(rs)
    gw, workers = groups["gateways"], groups[values["workers"]["groupName"]]
    assert gw["resources"] == {GATEWAY_RESOURCE: "1", "accelerator_type:L40S": "1"}
    assert workers["resources"] == {f"accelerator_type:{args.shard_resources.accelerator_type}": "1"}
    assert args.gateway_resources.accelerator_type == "L40S" != args.shard_resources.accelerator_type
    assert _container(gw)["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("override, message", [
    ({"gatewayGroup": {"gpus": 0}}, "gatewayGroup.gpus is 0"),
    ({"directGrpc": {"enabled": True, "port": 9000}}, "directGrpc.port 9000 is a port Serve or Ray uses"),
    ({"directGrpc": {"enabled": True, "port": 20150}}, "lies in expertPort"),
    ({"gatewayGroup": {"gpus": 1, "rayStartParams": {"num-cpus": "4"}}}, "gatewayGroup.rayStartParams sets num-cpus"),
    ({"gatewayGroup": {"gpus": 1, "groupName": _values("gpu-production")["workers"]["groupName"]}}, "must differ"),
])
def test_inconsistent_direct_grpc_values_fail_render(override, message):
    values = _values("gpu-production", **ON)
    for k, v in override.items():
        values[k] = {**values.get(k, {}), **v}
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(values)


def test_unknown_direct_grpc_fields_are_refused():
    with pytest.raises(helm.HelmError, match="additional properties"):
        _render({"directGrpc": {"enabled": True, "port": 9100, "tls": True}})


def test_custom_resources_reach_the_gateways_actor_options_and_builtins_are_refused():
    from pydantic import ValidationError

    from elasticmoe.app import build_app
    from elasticmoe.config import Resources

    gateway = build_app({"model": "tiny:mixtral", "gateway_resources": {"resources": {GATEWAY_RESOURCE: 1}}})
    options = gateway._bound_deployment.ray_actor_options
    assert options["resources"] == {GATEWAY_RESOURCE: 1.0} and options["num_cpus"] == 1.0
    shards = gateway._bound_deployment.init_args[2]
    assert "resources" not in shards._bound_deployment.ray_actor_options
    for bad in ({"CPU": 1}, {"memory": 1}, {"accelerator_type:H100": 1}, {"": 1}, {GATEWAY_RESOURCE: -1}):
        with pytest.raises(ValidationError, match="resources"):
            Resources(resources=bad)


def test_the_probes_port_check_passes_only_while_something_listens():
    """The last clause of the rendered readiness probe, run as rendered by bash: it passes while the port has a
    listener and fails once it is gone."""
    import socket
    import subprocess

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    values = {"directGrpc": {"enabled": True, "port": port}, "expertPort": {"start": 1024, "end": 1030}}
    rs = _one(_objects(_render(values)), "RayService")
    probe = _container(_groups(rs)["gateways"])["readinessProbe"]["exec"]["command"]
    check = probe[2].split("&&")[-1].strip()
    assert check == f": < /dev/tcp/127.0.0.1/{port}"
    assert subprocess.run([*probe[:2], check], capture_output=True).returncode == 0
    listener.close()
    assert subprocess.run([*probe[:2], check], capture_output=True).returncode != 0


def test_gateway_pods_have_a_disruption_budget():
    """With directGrpc the gateways (every ingress of the release) run in their own group, outside the workers'
    PodDisruptionBudget: a node drain could evict them all at once. They get one of their own."""
    objs = _objects(_render(_values("default", directGrpc={"enabled": True}, gateways=2)))
    pdbs = {o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: o
            for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {"worker", "gateway"}
    gw = _groups(_one(objs, "RayService"))["gateways"]
    assert gw["template"]["metadata"]["labels"].items() >= pdbs["gateway"]["spec"]["selector"]["matchLabels"].items()
    assert pdbs["gateway"]["spec"]["maxUnavailable"] == 1
    off = _objects(_render(_values("default", directGrpc={"enabled": True}, podDisruptionBudget={"enabled": False})))
    assert not [o for o in off if o["kind"] == "PodDisruptionBudget"]
