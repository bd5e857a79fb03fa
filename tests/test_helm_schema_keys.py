"""values.schema.json on the Kubernetes objects the chart passes into its pods and policy as written (securityContext,
podSecurityContext, affinity, tolerations, topologySpreadConstraints, env, extra volumes and mounts, NetworkPolicy peers
and extra rules): a misspelt key or a
wrong type fails `helm install` with a message naming it (Kubernetes drops an unknown field of a pod template without a
word: a misspelt `readOnlyRootFileSystem: false` or `podAntiAffinty` was a setting silently not applied), and every
field KubeRay's CRD knows there is taken."""

from __future__ import annotations

import re

import helm_python as helm
import pytest

from tests.helm_util import _chart, _check_rayservice, _objects, _one, _render
from tests.test_deploy_configs import CRD_DIR, _load

TSC = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}


@pytest.mark.parametrize("bad, where, key", [
    ({"securityContext": {"readOnlyRootFileSystem": False}}, "/securityContext", "readOnlyRootFileSystem"),
    ({"securityContext": {"capabilities": {"drop": ["ALL"], "ad": ["NET_ADMIN"]}}}, "/securityContext/capabilities",
     "ad"),
    ({"podSecurityContext": {"fsgroup": 100}}, "/podSecurityContext", "fsgroup"),
    ({"workers": {"affinity": {"podAntiAffinty": {}}}}, "/workers/affinity", "podAntiAffinty"),
    ({"head": {"affinity": {"nodeAffinty": {}}}}, "/head/affinity", "nodeAffinty"),
    ({"workers": {"tolerations": [{"key": "nvidia.com/gpu", "operater": "Exists"}]}}, "/workers/tolerations/0",
     "operater"),
    ({"head": {"topologySpreadConstraints": [{**TSC, "labelSelecter": {}}]}}, "/head/topologySpreadConstraints/0",
     "labelSelecter"),
    ({"head": {"env": [{"name": "A", "valu": "b"}]}}, "/head/env/0", "valu"),
    ({"env": [{"name": "A", "valueFom": {}}]}, "/env/0", "valueFom"),
    ({"networkPolicy": {"servingFrom": [{"namespaceSelector": {"matchLabels": {"a": "b"}}, "podSelecter": {}}]}},
     "/networkPolicy/servingFrom/0", "podSelecter"),
    ({"networkPolicy": {"egress": {"modelStore": {"to": [{"ipblock": {"cidr": "10.0.0.0/8"}}]}}}},
     "/networkPolicy/egress/modelStore/to/0", "ipblock"),
    ({"networkPolicy": {"extraIngress": [{"form": [{"podSelector": {}}], "ports": [{"port": 8000}]}]}},
     "/networkPolicy/extraIngress/0", "form"),  # dropped: the rule open to every peer
    ({"networkPolicy": {"egress": {"extra": [{"to": [], "ports": [{"prot": 443}]}]}}},
     "/networkPolicy/egress/extra/0/ports/0", "prot"),
    ({"extraVolumeMounts": [{"name": "w", "mountPath": "/w", "readonly": True}]}, "/extraVolumeMounts/0",
     "readonly"),  # dropped: a writable mount
    ({"extraVolumes": [{"name": "w", "persistentVolumeClam": {"claimName": "w"}}]}, "/extraVolumes/0",
     "persistentVolumeClam"),
])
def test_a_misspelt_key_fails_naming_it(bad, where, key):
    """E.g. servingFrom's misspelt podSelector beside a namespaceSelector: Kubernetes would drop it, opening the Serve
    ports to every pod of that namespace."""
    message = re.escape(f"at '{where}': additional properties '{key}' not allowed")
    with pytest.raises(helm.HelmValuesError, match=message):
        _chart().validate_schema(bad)
    with pytest.raises(helm.HelmValuesError, match=message):
        _render(bad)


@pytest.mark.parametrize("bad, where", [
    ({"workers": {"tolerations": [{"key": "a", "tolerationSeconds": "60"}]}},
     "/workers/tolerations/0/tolerationSeconds"),
    ({"podSecurityContext": {"supplementalGroups": ["100"]}}, "/podSecurityContext/supplementalGroups/0"),
    ({"securityContext": {"capabilities": {"drop": "ALL"}}}, "/securityContext/capabilities/drop"),
    ({"head": {"topologySpreadConstraints": [{**TSC, "maxSkew": "1"}]}}, "/head/topologySpreadConstraints/0/maxSkew"),
])
def test_a_wrong_type_fails_naming_the_key(bad, where):
    with pytest.raises(helm.HelmValuesError, match=re.escape(f"at '{where}': got string, want")):
        _chart().validate_schema(bad)


def _pod_schema() -> tuple[dict, dict]:
    crd = _load(CRD_DIR / "ray.io_rayservices.yaml")
    root = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    head = root["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["headGroupSpec"]
    pod = head["properties"]["template"]["properties"]["spec"]["properties"]
    return pod, pod["containers"]["items"]["properties"]


def _props(node: dict) -> dict:
    schema = _chart().schema
    while "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_the_schema_takes_every_field_kuberays_crd_has_there():
    """The schema's keys for each object are exactly the pod template's in KubeRay's CRD: none refused that
    Kubernetes takes."""
    pod, container = _pod_schema()
    values = _chart().schema["properties"]
    ours = {
        "securityContext": _props(values["securityContext"]),
        "podSecurityContext": _props(values["podSecurityContext"]),
        "affinity": _props(values["workers"]["properties"]["affinity"]),
        "tolerations": _props(values["head"]["properties"]["tolerations"])["items"],
        "topologySpreadConstraints": _props(values["workers"]["properties"]["topologySpreadConstraints"])["items"],
        "env": _props(values["env"])["items"],
        "volumeMounts": _props(values["extraVolumeMounts"])["items"],
        "volumes": _props(values["extraVolumes"])["items"],
    }
    theirs = {"securityContext": container["securityContext"], "podSecurityContext": pod["securityContext"],
              "affinity": pod["affinity"], "tolerations": pod["tolerations"]["items"],
              "topologySpreadConstraints": pod["topologySpreadConstraints"]["items"], "env": container["env"]["items"],
              "volumeMounts": container["volumeMounts"]["items"], "volumes": pod["volumes"]["items"]}
    for name, node in ours.items():
        assert node["additionalProperties"] is False, name
        assert set(node["properties"]) == set(theirs[name]["properties"]), name
        for field, spec in node["properties"].items():
            assert _props(spec).get("type", theirs[name]["properties"][field]["type"]) == theirs[name][
                "properties"][field]["type"], (name, field)
    caps = ours["securityContext"]["properties"]["capabilities"]
    assert set(caps["properties"]) == set(container["securityContext"]["properties"]["capabilities"]["properties"])
    policy = values["networkPolicy"]["properties"]
    assert set(_props(policy["servingFrom"])["items"]["properties"]) == {
        "ipBlock", "namespaceSelector", "podSelector"}  # NetworkPolicyPeer (networking.k8s.io/v1)
    assert set(policy["extraIngress"]["items"]["properties"]) == {"from", "ports"}  # NetworkPolicyIngressRule
    assert set(policy["egress"]["properties"]["extra"]["items"]["properties"]) == {"to", "ports"}
    assert set(policy["extraIngress"]["items"]["properties"]["ports"]["items"]["properties"]) == {
        "port", "endPort", "protocol"}  # NetworkPolicyPort


def test_well_spelt_kubernetes_objects_render():
    values = {
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "runAsGroup": 100,
                            "capabilities": {"drop": ["ALL"]}},
        "podSecurityContext": {"fsGroupChangePolicy": "OnRootMismatch", "supplementalGroups": [100]},
        "workers": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule",
                                     "tolerationSeconds": 60}],
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
                    "topologySpreadConstraints": [{**TSC, "matchLabelKeys": ["pod-template-hash"]}],
                    "env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
        "networkPolicy": {"servingFrom": [{"namespaceSelector": {"matchLabels": {"a": "b"}}, "podSelector": {}},
                                          {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                          "extraIngress": [{"from": [{"podSelector": {"matchLabels": {"a": "b"}}}],
                                            "ports": [{"port": "http", "protocol": "TCP"}]}],
                          "egress": {"extra": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}],
                                                "ports": [{"port": 5000, "endPort": 5010}]}]}},
        "extraVolumes": [{"name": "w", "persistentVolumeClaim": {"claimName": "w"}}],
        "extraVolumeMounts": [{"name": "w", "mountPath": "/w", "readOnly": True, "subPath": "x"}],
    }
    rs = _one(_objects(_render(values)), "RayService")
    _check_rayservice(rs)  # KubeRay's CRD, strict: every field lands where Kubernetes knows it
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["tolerations"] == values["workers"]["tolerations"]
    assert worker["containers"][0]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "w", "mountPath": "/w", "readOnly": True, "subPath": "x"} in worker["containers"][0]["volumeMounts"]
    policy = _one(_objects(_render(values)), "NetworkPolicy")["spec"]
    assert values["networkPolicy"]["extraIngress"][0] in policy["ingress"]
    assert values["networkPolicy"]["egress"]["extra"][0] in policy["egress"]


def test_every_schema_definition_is_used():
    """A definition no value refers to is a rule that checks nothing: `podGroup`, a stale copy of the head's keys
    (without topologySpreadConstraints), would have refused that key to a group it was pointed at."""
    import json

    text = json.dumps(_chart().schema)
    unused = [name for name in _chart().schema["definitions"] if f'"#/definitions/{name}"' not in text]
    assert unused == []
