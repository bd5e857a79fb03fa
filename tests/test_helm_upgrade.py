"""`helm upgrade` with changed values, as KubeRay takes the new RayService (tests/kuberay_rules.cluster_hash_view): the
Serve application's values (limits, replica counts, autoscaling, resources per replica, ...) change serveConfigV2
and leave the RayCluster, which Serve then updates in place; what Serve's proxies read from the pod environment when
they start, and a model with upgrade.newClusterOnModelChange or model.download, roll out as a new RayCluster, as the
chart's README says. And what Serve does on that cluster (tests/kuberay_rules.serve_update) when the release is
autoscaled: an upgrade at another scale than the last one's replaces nothing and keeps the count; new shard bounds
reach the running replicas in place."""

from __future__ import annotations

import pytest
import yaml

from tests.doc_util import CHART
from tests.helm_util import _deployments, _objects, _one, _render, _start_shards
from tests.kuberay_rules import cluster_hash_view, serve_update
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


# ----- an autoscaled release: the scale `helm upgrade` looks up, and the shard bounds
def _at(current: int | None, **override) -> dict:
    """The production values (elasticmoe's and Ray's autoscaling on), the active cluster at `current` worker pods
    (upgrade.currentWorkerReplicas: what `helm upgrade` looks up; None: a first install)."""
    return _rs("gpu-production", upgrade={"currentWorkerReplicas": current}, **override)


@pytest.mark.parametrize("before, after", [(None, 14), (14, 16), (16, 10), (18, 6)])
def test_an_upgrade_that_changes_nothing_keeps_every_replica_and_the_scale(before, after):
    """The cluster autoscaled between two `helm upgrade`s of the same values. The looked-up count went into the args
    (num_shards), which Serve hashes into the application's code version: every upgrade after a scale change rebuilt
    the application, replacing the controller, every gateway and every shard (weights loaded again), and restarted
    the count at the estimate. Now only the controller's user_config differs (start_shards, which a running
    controller ignores), applied in place."""
    old, new = _at(before), _at(after)
    assert cluster_hash_view(new) == cluster_hash_view(old)
    assert serve_update(old, new) in (None, {"Controller": {"user_config": "in place"}})
    assert _deployments(new)["ExpertShard"] == _deployments(old)["ExpertShard"]


def test_changed_shard_bounds_reach_the_running_replicas_in_place():
    """minShards / maxShards (with the worker pods' bounds) are Serve's autoscaling_config of the shards and the
    controller's user_config: neither rebuilds the application, and the shards' count is kept (no initial_replicas,
    which Serve would reset the count to), then brought within the new bounds by the controller."""
    old = _at(14)
    new = _at(14, autoscaling={"minShards": 2, "maxShards": 20}, workers={"minReplicas": 4, "maxReplicas": 22})
    assert cluster_hash_view(new) == cluster_hash_view(old)
    assert serve_update(old, new) == {"Controller": {"user_config": "in place"},
                                      "ExpertShard": {"autoscaling_config": "in place"}}
    scale, serve = _deployments(new)["Controller"]["user_config"], _deployments(new)["ExpertShard"]
    assert (scale["min_shards"], scale["max_shards"]) == (2, 20)
    assert (serve["autoscaling_config"]["min_replicas"], serve["autoscaling_config"]["max_replicas"]) == (2, 20)


def test_a_rebuilding_upgrade_keeps_the_shard_count():
    """A change of the args (a limit) rebuilds the application: Serve replaces every replica, rolling. The shards'
    autoscaling_config carries no initial_replicas, so Serve keeps their count through it rather than setting it to
    the chart's estimate (or `shards`); the new controller resumes its record (num_shards is `shards`, unchanged)."""
    old, new = _at(14), _at(14, limits={"maxQueue": 512})
    assert serve_update(old, new) == "redeploy"
    for rs in (old, new):
        assert "initial_replicas" not in _deployments(rs)["ExpertShard"]["autoscaling_config"]
    args = [yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"] for rs in (old, new)]
    assert args[0]["num_shards"] == args[1]["num_shards"] == _values("gpu-production")["shards"]


def test_the_shards_autoscaling_config_is_the_builders():
    """The chart's ExpertShard autoscaling_config replaces the one app.build_app makes (Serve takes a config's option
    whole): the same policy and timings, the bounds of the values."""
    from elasticmoe.app import shard_autoscaling

    for values in ({"autoscaling": {"enabled": True, "minShards": 1, "maxShards": 5}}, None):
        rs = _rs("default", **values) if values else _at(None)
        auto = (values or _values("gpu-production"))["autoscaling"]
        want = shard_autoscaling(auto["minShards"], auto["maxShards"])
        assert _deployments(rs)["ExpertShard"]["autoscaling_config"] == want
        assert set(_deployments(rs)) == {"Controller", "ExpertShard"}


def test_a_release_without_autoscaling_writes_no_deployment_options():
    rs = _rs("default")
    assert _deployments(rs) == {} and _start_shards(rs) == 2


def test_the_readme_says_how_an_autoscaled_release_keeps_its_scale():
    """Chart README, Upgrades: what the tests above show."""
    readme = " ".join((CHART / "README.md").read_text().split())
    upgrades = readme.split("## Upgrades", 1)[1].split("## Weights", 1)[0]
    for claim in ("changes only `start_shards`, which a running controller ignores: no replica is replaced and the "
                  "count stays", "New `autoscaling.minShards` / `maxShards` reach Serve and the running controller "
                  "in place", "the shards' `autoscaling_config` has no `initial_replicas`"):
        assert claim in upgrades, claim
