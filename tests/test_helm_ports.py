"""The chart's own ports (expertPort, directGrpc.port) kept out of Ray's worker ports on the pods that bind them,
checked when Helm renders the chart (helm-python-sdk), against `ray start`'s defaults or a group's rayStartParams."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.test_helm_chart import _check_rayservice, _objects, _one, _render
from tests.test_helm_values import _merge, _values

DIRECT = {"directGrpc": {"enabled": True, "port": 9100}}
GPU_GATEWAYS = {"gatewayGroup": {"gpus": 1}}  # the production values' gateways ask for a GPU
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
    pytest.param({"gatewayGroup": {"rayStartParams": {"worker-port-list": "9000,9101"}}}, id="port-list-clear"),
    pytest.param({**{g: {"rayStartParams": {"min-worker-port": "0"}} for g in GROUPS},
                  "expertPort": {"start": 15000, "end": 15099}}, id="random-worker-ports"),
])
def test_ports_clear_of_the_configured_worker_ports_render(override):
    _check_rayservice(_one(_objects(_render(_prod(override))), "RayService"))
