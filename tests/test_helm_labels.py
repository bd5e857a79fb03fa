"""Labels and selectors of the rendered release: each selector of the chart (metrics and direct-gRPC Services,
NetworkPolicy, PodDisruptionBudgets, ServiceMonitor, pack affinity) selects exactly the pods or Services it is for,
with and without directGrpc and user labels; a user label on a key the chart or KubeRay selects by fails the render
(it replaced the chart's own on the pods, or stood twice in one mapping)."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.helm_util import _objects, _one, _render
from tests.test_helm_resources import _direct, _full
from tests.test_helm_values import _merge, _values

USER = {"head": {"labels": {"team": "llm"}}, "workers": {"labels": {"team": "llm", "tier": "gpu"}},
        "gatewayGroup": {"labels": {"team": "llm"}}, "commonLabels": {"team": "llm"},
        "podDisruptionBudget": {"head": True}, "serviceMonitor": {"enabled": True}}
CASES = {
    "default": lambda: _merge(_full(_values("default")), USER),
    "gpu-production": lambda: _merge(_full(_values("gpu-production")), USER),
    "direct-grpc": lambda: _merge(_direct("gpu-production"), USER),
}


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("case", list(CASES))
def test_every_selector_selects_its_pods_only(case):
    objs = _objects(_render(CASES[case]()))
    cluster = _one(objs, "RayService")["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]["metadata"]["labels"]}
    for g in cluster["workerGroupSpecs"]:
        pods[g["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = g["template"]["metadata"]["labels"]
    assert set(pods) == ({"head", "worker", "gateway"} if case == "direct-grpc" else {"head", "worker"})
    assert all(labels.get("team") == "llm" for labels in pods.values())

    def chosen(selector: dict) -> set[str]:
        return {name for name, labels in pods.items() if _selects(selector, labels)}

    services = {o["metadata"]["name"].split("elasticmoe-", 1)[1]: o for o in objs if o["kind"] == "Service"}
    assert chosen(services["metrics"]["spec"]["selector"]) == set(pods)
    if "gateway" in pods:
        assert chosen(services["direct-grpc"]["spec"]["selector"]) == {"gateway"}
    assert chosen(_one(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]) == set(pods)
    budgets = {o["metadata"]["name"].rsplit("-", 1)[-1]: chosen(o["spec"]["selector"]["matchLabels"])
               for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert budgets == {"workers": {"worker"}, "head": {"head"}} | ({"gateways": {"gateway"}} if "gateway" in pods
                                                                   else {})
    monitor = _one(objs, "ServiceMonitor")["spec"]["selector"]["matchLabels"]
    serve = _one(objs, "RayService")["spec"]["serveService"]["metadata"]["labels"]
    assert [n for n, s in services.items() if _selects(monitor, s["metadata"]["labels"])] == ["metrics"]
    assert not _selects(monitor, serve)
    worker = next(g for g in cluster["workerGroupSpecs"]
                  if g["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
    pack = (worker["template"]["spec"].get("affinity") or {}).get("podAffinity")
    if pack:  # the production values pack the release's worker pods
        terms = [t["podAffinityTerm"]["labelSelector"]["matchLabels"]
                 for t in pack["preferredDuringSchedulingIgnoredDuringExecution"]]
        assert chosen(terms[0]) == {"worker"} and chosen(terms[1]) == set(pods)


@pytest.mark.parametrize("where, key", [
    ("workers", "app.kubernetes.io/instance"), ("workers", "app.kubernetes.io/component"),
    ("head", "elasticmoe.io/release"), ("gatewayGroup", "app.kubernetes.io/part-of"),
    ("workers", "app.kubernetes.io/name"), ("head", "ray.io/node-type"),
    ("commonLabels", "app.kubernetes.io/component"), ("commonLabels", "app.kubernetes.io/managed-by"),
])
def test_a_label_the_chart_or_kuberay_selects_by_fails_render(where, key):
    """E.g. workers.labels app.kubernetes.io/instance replaced the chart's: the NetworkPolicy, metrics Service and
    PodDisruptionBudget no longer selected the worker pods (and the policy's peers kept them from the head)."""
    values = {"commonLabels": {key: "x"}} if where == "commonLabels" else {where: {"labels": {key: "x"}}}
    name = "commonLabels" if where == "commonLabels" else f"{where}.labels"
    with pytest.raises(helm.HelmError, match=re.escape(f"{name}.{key}: a label the chart or KubeRay sets itself")):
        _render(values)
