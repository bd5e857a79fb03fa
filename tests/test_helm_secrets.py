"""Credentials stay in Secrets: every credential a rendered Ray pod or init container gets comes through a
secretKeyRef or a mounted Secret, never as a plain env value, and nothing of a Secret the chart makes (the internal
TLS key) shows in another object (RayService, ConfigMap, Service, ...); a Redis address with a password in it fails the
render, naming the value to use instead."""

from __future__ import annotations

import base64
import re

import helm_python as helm
import pytest
import yaml

from tests.helm_util import _objects, _one, _render
from tests.test_helm_values import _values

EVERYTHING = dict(  # the production values with every credential-bearing option on
    gcsFaultTolerance={"enabled": True}, serviceMonitor={"enabled": True}, grafana={"dashboard": {"enabled": True}},
    rayAuth={"mode": "token", "secretName": "ray-token"}, rayAutoscaler={"enabled": True},
)
CREDENTIAL = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|_KEY$", re.I)


def _credentials(rs: dict) -> list[tuple[dict, set[str]]]:
    """(env entry, mount paths of the container's Secret volumes) for every env entry named like a credential, in
    every container and init container of the Ray pods."""
    cluster = rs["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    out = []
    for spec in specs:
        secrets = {v["name"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec["containers"] + spec.get("initContainers", []):
            mounts = {m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in secrets}
            out += [(e, mounts) for e in c.get("env", []) if CREDENTIAL.search(e["name"])]
    return out


def _from_a_secret(env: dict, mounts: set[str]) -> bool:
    """A secretKeyRef, or (a *_KEY naming a file) the path of a file in a mounted Secret."""
    if "value" in env:
        return any(env["value"].startswith(m.rstrip("/") + "/") for m in mounts)
    return bool(env["valueFrom"]["secretKeyRef"]["name"])


@pytest.mark.parametrize("name", ["default", "gpu-production", "everything"])
def test_credentials_reach_the_pods_from_secrets_only(name):
    values = _values("gpu-production", **EVERYTHING) if name == "everything" else _values(name)
    objs = _objects(_render(values or None))
    rs = _one(objs, "RayService")
    credentials = _credentials(rs)
    assert credentials and all(_from_a_secret(e, m) for e, m in credentials), credentials
    if name != "default":  # the Hugging Face token of the download (the internal TLS key: a mounted file)
        assert {e["name"] for e, _ in credentials} == {"HF_TOKEN", "ELASTICMOE_TLS_KEY"}
        ft = rs["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions")
        assert (ft is not None) == (name == "everything")
        assert ft is None or set(ft["redisPassword"]) == {"valueFrom"}
    secret = next((o for o in objs if o["kind"] == "Secret"), None)
    if secret:  # the generated internal TLS key, in no other object
        key = base64.b64decode(secret["data"]["tls.key"]).decode()
        body = "".join(key.splitlines()[1:3])
        others = yaml.safe_dump_all([o for o in objs if o is not secret])
        assert body not in others.replace("\n", "") and secret["data"]["tls.key"] not in others


@pytest.mark.parametrize("address", ["redis://:hunter2@redis.db.svc:6379", "redis://default:hunter2@redis:6379",
                                     "rediss://user@redis:6380"])
def test_a_redis_address_with_credentials_fails_render(address):
    """KubeRay passes redisAddress to the head as RAY_REDIS_ADDRESS, in plain text in the RayService and the pod."""
    with pytest.raises(helm.HelmError, match=re.escape("gcsFaultTolerance.redisAddress holds credentials")):
        _render(_values("gpu-production", gcsFaultTolerance={"enabled": True, "redisAddress": address}))
