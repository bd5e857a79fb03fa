"""The commands and names `helm install` prints (templates/NOTES.txt) are the rendered release's: each `kubectl
port-forward svc/NAME LOCAL:REMOTE` names a Service the release has (the chart's, or KubeRay's <fullname>-serve-svc /
<fullname>-head-svc, whose ports are the serveService's / the head container's) and one of its ports, the client
commands use the forwarded local ports, and the replica counts are the Serve config's."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helm_util import _objects, _one, _render, _start_shards
from tests.test_deploy_configs import NAMESPACE
from tests.test_helm_resources import _direct, _full
from tests.test_helm_values import _merge, _values

CASES = {
    "default": lambda: _full(_values("default")),
    "gpu-production": lambda: _full(_values("gpu-production")),
    "at-current-scale": lambda: _full(_values("gpu-production", upgrade={"currentWorkerReplicas": 14})),
    "direct-at-current-scale": lambda: _merge(_direct("gpu-production"), {"upgrade": {"currentWorkerReplicas": 14}}),
    "moved-ports": lambda: _full(_values("default", fullnameOverride="llm", serve={"httpPort": 8500, "grpcPort": 8600},
                                         head={"rayStartParams": {"dashboard-port": "8400"}})),
}


def _service_ports(objs: list[dict]) -> dict[str, set[int]]:
    """Service name -> ports, the chart's and the two KubeRay makes for the RayService."""
    rs = _one(objs, "RayService")
    name = rs["metadata"]["name"]
    serve = rs["spec"]["serveService"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {serve["metadata"]["name"]: {p["port"] for p in serve["spec"]["ports"]},
             f"{name}-head-svc": {p["containerPort"] for p in head["ports"]}}
    chart = [o for o in objs if o["kind"] == "Service"]
    return ports | {o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]} for o in chart}


@pytest.mark.parametrize("case", list(CASES))
def test_notes_name_what_was_rendered(case):
    rendered = _render(CASES[case]())
    notes, objs = rendered["elasticmoe/templates/NOTES.txt"], _objects(rendered)
    rs = _one(objs, "RayService")
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    services = _service_ports(objs)
    forwards = re.findall(r"kubectl -n (\S+) port-forward svc/(\S+) (\d+):(\d+)", notes)
    assert len(forwards) == 3
    for ns, svc, _, remote in forwards:
        assert ns == NAMESPACE and int(remote) in services[svc], (svc, remote, services.get(svc))
    local = {int(lo) for _, _, lo, _ in forwards}
    used = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", notes)}
    assert used <= local and len(used) == 3
    assert re.findall(r"get rayservice (\S+) -w", notes) == [rs["metadata"]["name"]]
    assert f"replicas: {args['num_gateways']} gateway(s), {_start_shards(rs)} expert shard(s)" in notes
    inside = re.findall(r"([\w.-]+)\.%s\.svc:(\d+)" % NAMESPACE, notes)
    assert len(inside) >= 2
    for host, port in inside:
        assert int(port) in services[host], (host, port)
