"""The readiness probes of the chart's Ray pods, as KubeRay runs them (the chart's own, or the one KubeRay adds:
tests/kuberay_rules.py), connect only to ports something listens on in that pod: Ray's dashboard agent (where the
group's rayStartParams put it), the dashboard on the head, Serve's HTTP proxy where one runs (the head; every pod with
proxyLocation EveryNode), a gateway's direct gRPC port on the gateway pods. A probe on a port nothing serves keeps the
pod unready for good: out of its Services, and its PodDisruptionBudget closed to every node drain."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.helm_util import _objects, _one, _render
from tests.kuberay_rules import probe_ports, rayservice_errors, readiness_probe
from tests.test_helm_resources import _direct, _full
from tests.test_helm_values import _merge, _values

HEAD_ONLY = {"serve": {"proxyLocation": "HeadOnly"}}
MOVED = {"dashboard-agent-listen-port": "52400"}
CASES = {
    "default": lambda: _full(_values("default")),
    "gpu-production": lambda: _full(_values("gpu-production")),
    "head-only": lambda: _merge(_full(_values("default")), HEAD_ONLY),
    "gpu-production-head-only": lambda: _merge(_full(_values("gpu-production")), HEAD_ONLY),
    "direct-grpc": lambda: _direct("default"),
    "direct-grpc-head-only": lambda: _merge(_direct("default"), HEAD_ONLY),
    "agent-moved": lambda: _merge(_direct("gpu-production"), {g: {"rayStartParams": MOVED}
                                                               for g in ("head", "workers", "gatewayGroup")}),
    "gateway-agent-moved": lambda: _merge(_direct("default"), {"gatewayGroup": {"rayStartParams": MOVED}}),
}


def _listeners(values: dict, group: dict | None) -> set[int]:
    """The ports a Ray pod of the group (None: the head) serves, by what the values start there."""
    params = (group or values["head"]).get("rayStartParams") or {}
    ports = {int(params.get("dashboard-agent-listen-port", 52365))}
    if group is None:
        ports.add(int(params.get("dashboard-port", 8265)))
    if group is None or values["serve"]["proxyLocation"] != "HeadOnly":
        ports.add(values["serve"]["httpPort"])
    if group is not None and group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
        ports.add(values["directGrpc"]["port"])
    return ports


@pytest.mark.parametrize("case", list(CASES))
def test_readiness_probes_reach_what_the_pod_serves(case):
    values = CASES[case]()
    rs = _one(_objects(_render(values)), "RayService")
    assert rayservice_errors(rs) == []
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [(None, cluster["headGroupSpec"])] + [(g, g) for g in cluster["workerGroupSpecs"]]
    for group, spec in pods:
        (container,) = spec["template"]["spec"]["containers"]
        params = spec.get("rayStartParams") or {}
        probe = readiness_probe(container, "head" if group is None else "worker", params, cluster["rayVersion"])
        ports, serving = probe_ports(probe), _listeners(values, group)
        assert ports and ports <= serving, (spec.get("groupName", "head"), sorted(ports), sorted(serving))


def test_head_only_worker_probe_checks_the_raylet_and_nothing_else():
    """With HeadOnly the worker pods run no Serve proxy: their probe asks the raylet only (KubeRay's own would ask a
    proxy on port 8000, and never pass)."""
    rs = _one(_objects(_render(CASES["head-only"]())), "RayService")
    (workers,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    (script,) = container["readinessProbe"]["exec"]["command"][2:]
    assert script == "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
    assert {p["name"] for p in container["ports"]} == {"metrics"}
    on = _one(_objects(_render(CASES["default"]())), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert "readinessProbe" not in on[0]["template"]["spec"]["containers"][0]  # EveryNode: KubeRay's own


def test_head_only_without_the_head_in_the_serve_service_fails_render():
    """The head's proxy is the only one with HeadOnly; KubeRay's excludeHeadPodFromServeSvc would take it out of
    <fullname>-serve-svc, leaving the Service without an endpoint."""
    values = _merge(CASES["head-only"](), {"rayService": {"excludeHeadPodFromServeSvc": True}})
    with pytest.raises(helm.HelmError, match=re.escape("serve.proxyLocation HeadOnly with "
                                                       "rayService.excludeHeadPodFromServeSvc")):
        _render(values)
    _render(_merge(CASES["default"](), {"rayService": {"excludeHeadPodFromServeSvc": True}}))


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("default", "gpu-production")])  # the chart's probes
def test_every_wget_of_a_probe_tries_once(case):
    """wget tries 20 times by default (`-T 2` each, a read timeout retried): a raylet or proxy that stopped answering
    kept the chart's probe running past its timeoutSeconds, a timeout instead of a failure, as KubeRay's own probe
    avoids with --tries 1 (kuberay_rules.readiness_probe)."""
    rs = _one(_objects(_render(CASES[case]())), "RayService")
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    scripts = [" ".join(c["readinessProbe"]["exec"]["command"]) for g in groups
               for c in g["template"]["spec"]["containers"] if "exec" in c.get("readinessProbe", {})]
    assert scripts
    for script in scripts:
        calls = re.findall(r"wget [^|]*", script)
        assert calls and all(re.search(r"--tries[ =]1\b", call) for call in calls), script
