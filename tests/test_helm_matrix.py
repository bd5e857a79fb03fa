"""Every values file under combinations of the switches an operator flips (elasticmoe's and Ray's autoscaling,
internal TLS, API keys, directGrpc, the upgrade strategy), each render held to everything the other chart tests model
of KubeRay: its CRD and Serve's schema, the operator's admission rules, replicas that fit a pod of their group,
readiness probes on ports the pods serve, credentials from Secrets only."""

from __future__ import annotations

import pytest

from tests.helm_util import _check_rayservice, _objects, _one, _render
from tests.kuberay_rules import probe_ports, rayservice_errors, readiness_probe
from tests.test_helm_probes import _listeners
from tests.test_helm_resources import _direct, _full, _placement
from tests.test_helm_secrets import _credentials, _from_a_secret
from tests.test_helm_values import VALUE_SETS, _merge, _values

INCREMENTAL = {"strategy": "NewClusterWithIncrementalUpgrade",
               "clusterUpgradeOptions": {"gatewayClassName": "istio", "stepSizePercent": 25, "intervalSeconds": 60}}
SWITCHES = {  # name -> (directGrpc, overrides)
    "all-off": (False, {"autoscaling": {"enabled": False}, "rayAutoscaler": {"enabled": False},
                        "internalTls": {"enabled": False}, "apiKeys": {"existingSecret": ""}}),
    "all-on": (True, {"autoscaling": {"enabled": True}, "rayAutoscaler": {"enabled": True},
                      "internalTls": {"enabled": True}, "apiKeys": {"existingSecret": "keys"}, "upgrade": INCREMENTAL}),
    "ray-autoscaler-only": (False, {"autoscaling": {"enabled": False}, "rayAutoscaler": {"enabled": True},
                                    "apiKeys": {"existingSecret": "keys"}}),
}


def _values_for(name: str, switch: str) -> dict:
    direct, override = SWITCHES[switch]
    values = _merge(_direct(name) if direct else _full(_values(name)), override)
    auto = values["autoscaling"]
    if auto["enabled"] and not auto["minShards"] <= values["shards"] <= auto["maxShards"]:
        values = _merge(values, {"autoscaling": {"minShards": 1, "maxShards": max(values["shards"], 8)}})
    return values


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_values_and_switches_render_what_kuberay_takes(name, switch):
    values = _values_for(name, switch)
    rs = _one(_objects(_render(values)), "RayService")
    args = _check_rayservice(rs)
    assert rayservice_errors(rs) == []
    assert (args.autoscaling is not None) == values["autoscaling"]["enabled"]
    assert args.insecure_internal is not values["internalTls"]["enabled"]
    where = _placement(rs)
    direct = SWITCHES[switch][0]
    assert values["workers"]["groupName"] in where["shard"]
    assert (values["gatewayGroup"]["groupName"] if direct else values["workers"]["groupName"]) in where["gateway"]
    cluster = rs["spec"]["rayClusterConfig"]
    for group, spec in [(None, cluster["headGroupSpec"])] + [(g, g) for g in cluster["workerGroupSpecs"]]:
        (container,) = spec["template"]["spec"]["containers"]
        probe = readiness_probe(container, "head" if group is None else "worker", spec.get("rayStartParams") or {},
                                cluster["rayVersion"])
        assert probe_ports(probe) <= _listeners(values, group)
    assert all(_from_a_secret(e, m) for e, m in _credentials(rs))
