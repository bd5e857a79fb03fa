"""The chart's own ports (expertPort, directGrpc.port), Serve's proxy ports and Ray's own ports kept out of Ray's
worker ports on the pods that bind them, checked when Helm renders the chart (helm-python-sdk), against
`ray start`'s defaults or a group's rayStartParams."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.helm_util import _check_rayservice, _objects, _one, _render
from tests.test_helm_values import _merge, _values

DIRECT = {"directGrpc": {"enabled": True, "port": 9100}}
# the production values' gateways ask for a GPU, 4 CPUs and 32 GiB: gateway pods sized as the workers
GPU_GATEWAYS = {"gatewayGroup": {"gpus": 1, "resources": _values("gpu-production")["workers"]["resources"]}}
GROUPS = ("head", "workers", "gatewayGroup")  # the pods an expert shard may run on (CPU shards: any of them)


def _prod(override: dict) -> dict:
    """The production values, the gateways in their own group (directGrpc), `override` merged in."""
    return _merge(_values("gpu-production", **DIRECT, **GPU_GATEWAYS), override)


@pytest.mark.parametrize("name", ["default", "gpu-production"])
def test_the_default_ports_render(name):
    """expertPort 20100-20199 and directGrpc.port 9100 lie outside Ray's default worker ports (10002-19999)."""
    values = _prod({}) if name == "gpu-production" else _values(name, **DIRECT)
    _check_rayservice(_one(_objects(_render(values)), "RayService"))


@pytest.mark.parametrize("override, message", [
    pytest.param({"expertPort": {"start": 15000, "end": 15099}},
                 "expertPort 15000-15099 overlaps Ray's worker ports 10002-19999 on the gpu pods "
                 "(ray start's default, moved by workers.rayStartParams", id="expert-inside"),
    pytest.param({"expertPort": {"start": 19990, "end": 20089}},
                 "expertPort 19990-20089 overlaps Ray's worker ports 10002-19999", id="expert-straddles"),
    pytest.param({"directGrpc": {"enabled": True, "port": 12000}},
                 "directGrpc.port 12000 overlaps Ray's worker ports 10002-19999", id="direct-inside"),
    pytest.param({"workers": {"rayStartParams": {"min-worker-port": "20000", "max-worker-port": "20999"}}},
                 "expertPort 20100-20199 overlaps Ray's worker ports 20000-20999 on the gpu pods "
                 "(workers.rayStartParams min-worker-port / max-worker-port)", id="expert-vs-moved-range"),
    pytest.param({"workers": {"rayStartParams": {"min-worker-port": "20150", "max-worker-port": "0"}}},
                 "overlaps Ray's worker ports 20150-65535 on the gpu pods", id="max-0-is-65535"),
    pytest.param({"directGrpc": {"enabled": True, "port": 9100},
                  "gatewayGroup": {"rayStartParams": {"worker-port-list": "9000,9100"}}},
                 "directGrpc.port 9100 overlaps Ray's worker port 9100 on the gateways pods "
                 "(gatewayGroup.rayStartParams worker-port-list)", id="direct-in-port-list"),
])
def test_a_port_among_rays_worker_ports_fails_render(override, message):
    """A Ray worker may hold any port of its range: a shard's or gateway's bind there failed at random."""
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(_prod(override))


@pytest.mark.parametrize("override", [
    pytest.param({**{g: {"rayStartParams": {"min-worker-port": "30000", "max-worker-port": "39999"}} for g in GROUPS},
                  "expertPort": {"start": 15000, "end": 15099}}, id="ranges-moved-away"),
    pytest.param({"gatewayGroup": {"rayStartParams": {"worker-port-list": "8900,9101"}}}, id="port-list-clear"),
    pytest.param({**{g: {"rayStartParams": {"min-worker-port": "0"}} for g in GROUPS},
                  "expertPort": {"start": 15000, "end": 15099}}, id="random-worker-ports"),
])
def test_ports_clear_of_the_configured_worker_ports_render(override):
    _check_rayservice(_one(_objects(_render(_prod(override))), "RayService"))


# Serve's proxy ports (on the head, and with proxyLocation EveryNode on every worker pod) and Ray's own ports
# (GCS 6379, dashboard 8265, client 10001 on the head; metrics export 8080, dashboard agent 52365 on every pod)
RANGE = ("min-worker-port", "max-worker-port")


def _range(group: str, lo: int, hi: int) -> dict:
    return {group: {"rayStartParams": dict(zip(RANGE, (str(lo), str(hi))))}}


@pytest.mark.parametrize("override, message", [
    pytest.param({"serve": {"httpPort": 15000}},
                 "serve.httpPort 15000 overlaps Ray's worker ports 10002-19999 on the gpu pods", id="http-default"),
    pytest.param({"serve": {"grpcPort": 12000}},
                 "serve.grpcPort 12000 overlaps Ray's worker ports 10002-19999 on the gpu pods", id="grpc-default"),
    pytest.param({"serve": {"grpcPort": 12000, "proxyLocation": "HeadOnly"}},
                 "serve.grpcPort 12000 overlaps Ray's worker ports 10002-19999 on the head pods", id="head-only-head"),
    pytest.param(_range("workers", 8100, 9999),
                 "serve.grpcPort 9000 overlaps Ray's worker ports 8100-9999 on the gpu pods "
                 "(workers.rayStartParams min-worker-port / max-worker-port)", id="grpc-in-moved-range"),
    pytest.param(_range("gatewayGroup", 7900, 8010),
                 "serve.httpPort 8000 overlaps Ray's worker ports 7900-8010 on the gateways pods", id="http-gateways"),
    pytest.param({"head": {"rayStartParams": {"worker-port-list": "8000,30000"}}},
                 "serve.httpPort 8000 overlaps Ray's worker port 8000 on the head pods "
                 "(head.rayStartParams worker-port-list)", id="http-in-head-list"),
    pytest.param(_range("head", 6000, 7000),
                 "Ray's GCS port 6379 overlaps Ray's worker ports 6000-7000 on the head pods", id="gcs"),
    pytest.param(_range("head", 8200, 8300),
                 "Ray's dashboard port 8265 overlaps Ray's worker ports 8200-8300 on the head pods", id="dashboard"),
    pytest.param(_range("head", 10000, 10999),
                 "Ray's client port 10001 overlaps Ray's worker ports 10000-10999 on the head pods", id="client"),
    pytest.param({"head": {"rayStartParams": {"dashboard-port": "8400", "worker-port-list": "8400"}}},
                 "Ray's dashboard port 8400 overlaps Ray's worker port 8400 on the head pods", id="moved-dashboard"),
    pytest.param({"workers": {"rayStartParams": {"worker-port-list": "8080,30000"}}},
                 "Ray's metrics export port 8080 overlaps Ray's worker port 8080 on the gpu pods", id="metrics"),
    pytest.param(_range("workers", 50000, 59999),
                 "Ray's dashboard agent port 52365 overlaps Ray's worker ports 50000-59999 on the gpu pods",
                 id="dashboard-agent"),
])
def test_serve_or_ray_port_among_rays_worker_ports_fails_render(override, message):
    """Serve's proxy binds its ports on every pod it runs on, after the pod's Ray workers may hold them."""
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        _render(_prod(override))


@pytest.mark.parametrize("override", [
    pytest.param({"serve": {"proxyLocation": "HeadOnly"}, **_range("workers", 8100, 9999)}, id="no-proxy-on-workers"),
    pytest.param({"head": {"rayStartParams": {"dashboard-port": "8400", "worker-port-list": "8265"}}},
                 id="dashboard-moved-off-the-list"),
    pytest.param(_range("workers", 6000, 7000), id="gcs-only-on-head"),
    pytest.param({"serve": {"httpPort": 8500, "grpcPort": 8600}}, id="serve-ports-moved-clear"),
])
def test_serve_and_ray_ports_clear_of_the_worker_ports_render(override):
    _check_rayservice(_one(_objects(_render(_prod(override))), "RayService"))


@pytest.mark.parametrize("group, key", [("head", "metrics-export-port"), ("head", "dashboard-host"),
                                        ("workers", "metrics-export-port"), ("gatewayGroup", "metrics-export-port")])
def test_start_params_the_chart_sets_are_refused(group, key):
    """The chart writes these rayStartParams itself; a user's copy rendered a second, duplicate YAML key."""
    with pytest.raises(helm.HelmError, match=re.escape(f"{group}.rayStartParams.{key} is set by the chart")):
        _render(_prod({group: {"rayStartParams": {key: "8090"}}}))


MOVED_HEAD = {"port": "6380", "dashboard-port": "8400", "ray-client-server-port": "10000",
              "dashboard-agent-listen-port": "52400"}


def test_head_ports_moved_by_rayStartParams_are_the_ones_published():
    """KubeRay builds the head Service from the head container's ports and calls the dashboard on the port named
    `dashboard`: ports Ray was told to bind elsewhere but published at their defaults left workers unable to join
    (GCS) and the operator unable to deploy Serve (dashboard), and the NetworkPolicy let the operator in on ports
    nothing listened on."""
    objs = _objects(_render(_prod({"head": {"rayStartParams": MOVED_HEAD}})))
    rs = _one(objs, "RayService")
    _check_rayservice(rs)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["port"] == "6380"
    (container,) = [c for c in head["template"]["spec"]["containers"] if c["name"] == "ray-head"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["gcs-server"], ports["dashboard"], ports["client"]) == (6380, 8400, 10000)
    policy = _one(objs, "NetworkPolicy")["spec"]["ingress"]
    operator = [r for r in policy if {"port": 8400, "protocol": "TCP"} in r.get("ports", [])]
    assert len(operator) == 1 and {"port": 52400, "protocol": "TCP"} in operator[0]["ports"]
    assert not [r for r in policy if {"port": 8265, "protocol": "TCP"} in r.get("ports", [])]


def test_a_serve_port_on_a_moved_head_port_fails_render():
    """Serve's proxy and the direct port are checked against the head's ports as rayStartParams set them."""
    with pytest.raises(helm.HelmError, match=re.escape("serve.httpPort 8400 is a port Ray uses on the pods (GCS 6380, "
                                                       "metrics 8080, dashboard 8400, client 10000")):
        _render(_prod({"head": {"rayStartParams": MOVED_HEAD}, "serve": {"httpPort": 8400}}))
    with pytest.raises(helm.HelmError, match=re.escape("directGrpc.port 6380 is a port Serve or Ray uses")):
        _render(_prod({"head": {"rayStartParams": MOVED_HEAD}, "directGrpc": {"enabled": True, "port": 6380}}))
