"""The Helm chart's test helpers: rendered with Helm's own engine (helm-python-sdk), RayServices checked against
KubeRay's CRD (../shared/kuberay-crds/) and Serve's schema."""

from __future__ import annotations

import pickle
from functools import lru_cache

import helm_python as helm  # helm-python-sdk (dev dependency): Helm's Go SDK as a shared library
import jsonschema
import yaml

from elasticmoe.config import ScaleConfig
from tests.test_deploy_configs import (CHART_DIR, CRD_DIR, IMPORT_PATH, NAMESPACE, RELEASE, SERVICER, _app_args,
                                       _load, _serve_schema)


@lru_cache(maxsize=None)
def _chart():
    return helm.Chart.load(str(CHART_DIR))


def _prod_values() -> dict:
    return helm.values_from_yaml((CHART_DIR / "values-gpu-production.yaml").read_text())


_RENDERS: dict[object, dict[str, str]] = {}  # _key(values) -> the chart rendered with them
_PARSED: dict[str, bytes] = {}  # a rendered manifest -> its documents, pickled
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x PyYAML's own parser


def _key(value):
    """`value` as a hashable, exact key: types kept (1, 1.0, True and "1" differ), dicts by their sorted items."""
    if isinstance(value, dict):
        return dict, tuple(sorted(((repr(k), _key(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_key(v) for v in value)
    return type(value), value


def _render(values: dict | None = None, fresh: bool = False) -> dict[str, str]:
    """The chart rendered with `values`; rendered once per distinct values in a session (the helm test files render
    the same values over and over, ~0.02 s of CPU each with the chart's ECDSA keys, ~0.2 s when they were RSA), so
    the same values give the same generated CA and certificate: `fresh` renders anew. A failed render is not kept:
    it raises each time."""
    try:
        key = _key(values)
        hash(key)
    except TypeError:  # a value that is neither a dict, a list nor hashable: render it every time
        fresh = True
    if fresh:
        return _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    if key not in _RENDERS:
        _RENDERS[key] = _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return dict(_RENDERS[key])


def _objects(rendered: dict[str, str]) -> list[dict]:
    """The rendered manifests' documents (NOTES.txt aside); each manifest parsed once a session, then a fresh copy
    each call (callers may change what they get)."""
    objs = []
    for name, text in rendered.items():
        if name.endswith("NOTES.txt"):
            continue
        if text not in _PARSED:
            _PARSED[text] = pickle.dumps([d for d in yaml.load_all(text, Loader=_YAML_LOADER) if d])
        objs += pickle.loads(_PARSED[text])
    return objs


def _one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _strict(schema):
    """OpenAPI v3 (CRD) schema -> JSON Schema that, like `kubectl apply` (server-side
    field validation Strict), rejects unknown fields, and knows `nullable`."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@lru_cache(maxsize=None)
def _crd_validator(crd_file: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / crd_file
    assert path.is_file(), f"KubeRay CRD not found at {path} (expected ../shared/kuberay-crds/ beside the repo)"
    crd = _load(path)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _check_rayservice(rs: dict):
    """Validate a rendered RayService (CRD schema, Serve schema, AppArgs, the controller's user_config as it takes it:
    config.ScaleConfig within the args); returns its AppArgs."""
    errors = sorted(_crd_validator("ray.io_rayservices.yaml").iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "RayService does not match KubeRay's CRD:\n" + "\n".join(
        f"  {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:20])
    assert rs["apiVersion"] == "ray.io/v1"
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    schema = _serve_schema(serve)
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER]
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    args = _app_args(app.args)
    for d in app.deployments:
        if d.name == "Controller":
            ScaleConfig.model_validate(d.user_config).within(args)
    return args


def _deployments(rs: dict) -> dict[str, dict]:
    """The Serve application's `deployments` entries by name (the options Serve applies over the builder's)."""
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return {d["name"]: d for d in app.get("deployments", [])}


def _start_shards(rs: dict) -> int:
    """The shard count the application starts at: the controller's start_shards (autoscaling), else num_shards."""
    scale = _deployments(rs).get("Controller", {}).get("user_config") or {}
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return scale.get("start_shards") or app["args"]["num_shards"]


def _containers(rs: dict) -> list[tuple[dict, dict]]:
    """(pod spec, container) of the head and every worker group."""
    cluster = rs["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return [(spec, c) for spec in specs for c in spec["containers"]]


def _port_ranges(rule: dict) -> list[tuple[int, int]]:
    return [(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", [])]
