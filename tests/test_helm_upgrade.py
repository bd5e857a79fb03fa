"""`helm upgrade` with changed values, as KubeRay takes the new RayService (tests/kuberay_rules.cluster_hash_view): the
Serve application's values (limits, replica counts, autoscaling, resources per replica, ...) change serveConfigV2
and leave the RayCluster, which Serve then updates in place; what Serve's proxies read from the pod environment when
they start, and a model with upgrade.newClusterOnModelChange or model.download, roll out as a new RayCluster, as the
chart's README says."""

from __future__ import annotations

import pytest

from tests.doc_util import CHART
from tests.helm_util import _objects, _one, _render
from tests.kuberay_rules import cluster_hash_view
from tests.test_helm_values import _values

IN_PLACE = {  # values of the Serve application: a new serveConfigV2 on the same RayCluster
    "limits.maxNumSeqs": {"limits": {"maxNumSeqs": 8}},
    "limits.maxModelLen": {"limits": {"maxModelLen": 1024}},
    "limits.expertTimeoutSeconds": {"limits": {"expertTimeoutSeconds": 7}},
    "limits.extra.transport": {"limits": {"extra": {"transport": "stream", "max_prompt_tokens": 1000}}},
    "shards": {"shards": 4},
    "gateways": {"gateways": 3},
    "autoscaling.enabled": {"autoscaling": {"enabled": True, "minShards": 1, "maxShards": 4}},
    "expertMetrics": {"expertMetrics": "per_layer"},
    "serve.logLevel": {"serve": {"logLevel": "DEBUG", "logEncoding": "TEXT"}},
    "shardResources.numCpus": {"shardResources": {"numCpus": 1, "memory": 1 << 30}},
    "model.servedName": {"model": {"servedName": "moe"}},
    "model.path": {"model": {"path": "tiny:qwen3"}},  # newClusterOnModelChange false, no download
}
PROD_IN_PLACE = {
    "autoscaling.maxShards": {"autoscaling": {"maxShards": 12, "targetUtilization": 0.5}},
    "serve.requestTimeoutSeconds": {"serve": {"requestTimeoutSeconds": 300}},
    "limits.maxQueue": {"limits": {"maxQueue": 512}},
}
NEW_CLUSTER = {  # read by the pods (Serve's proxies at their start) or put in their template
    "limits.extra.max_body_bytes": ("default", {"limits": {"extra": {"max_body_bytes": 8 << 20}}}),
    "serve.grpcMaxMessageBytes": ("default", {"serve": {"grpcMaxMessageBytes": 8 << 20}}),
    "model.revision": ("gpu-production", {"model": {"revision": "f" * 40}}),  # newClusterOnModelChange
    "model.path (download)": ("gpu-production", {"model": {"path": "org/other"},
                                                 "upgrade": {"newClusterOnModelChange": False}}),
}


def _rs(name: str, **override) -> dict:
    return _one(_objects(_render(_values(name, **override) or None)), "RayService")


NOT_ON_PROD = ("model.path", "shards", "gateways", "autoscaling.enabled")  # a new cluster there, or more pods


@pytest.mark.parametrize("name, change", [("default", c) for c in IN_PLACE] + [
    ("gpu-production", c) for c in (*IN_PLACE, *PROD_IN_PLACE) if c not in NOT_ON_PROD])
def test_serve_values_update_the_serve_config_on_the_same_cluster(name, change):
    base, new = _rs(name), _rs(name, **{**IN_PLACE, **PROD_IN_PLACE}[change])
    assert new["spec"]["serveConfigV2"] != base["spec"]["serveConfigV2"]
    assert cluster_hash_view(new) == cluster_hash_view(base)


def test_replica_counts_on_the_production_values_stay_on_the_cluster():
    """More shards and gateways than the production worker pods hold need more pods: a replica count, which KubeRay
    leaves out of its comparison."""
    base = _rs("gpu-production")
    new = _rs("gpu-production", shards=10, gateways=3, workers={"replicas": 13, "maxReplicas": 20})
    assert new["spec"]["serveConfigV2"] != base["spec"]["serveConfigV2"]
    assert cluster_hash_view(new) == cluster_hash_view(base)


@pytest.mark.parametrize("change", list(NEW_CLUSTER))
def test_what_the_pods_read_rolls_out_as_a_new_cluster(change):
    name, override = NEW_CLUSTER[change]
    assert cluster_hash_view(_rs(name, **override)) != cluster_hash_view(_rs(name))


def test_the_readme_names_the_serve_values_that_make_a_new_cluster():
    """Chart README, Upgrades: the limits and serve values that change the pods, not the Serve config alone."""
    readme = " ".join((CHART / "README.md").read_text().split())
    for key in ("limits.extra.max_body_bytes", "serve.grpcMaxMessageBytes"):
        assert key in readme.split("## Upgrades", 1)[1].split("## Weights", 1)[0], key
