"""The chart's security defaults, rendered with Helm's engine and validated against KubeRay's CRD: the generated
internal CA and certificate work for a real mTLS expert shard; existing-Secret and cert-manager sources; Ray token
auth; read-only root filesystems with emptyDirs, RuntimeDefault seccomp; no service-account token on workers; API keys
from a Secret; the NetworkPolicy (operator by namespace AND pod, serving from the namespace, metrics from monitoring,
egress); the certificates' key kinds; a chart-made model volume kept on uninstall."""

from __future__ import annotations

import base64
import re
import socket
import threading

import helm_python as helm
import pytest
import torch

from tests.helm_util import _check_rayservice, _chart, _containers, _objects, _one, _port_ranges, _prod_values, _render

DASHBOARD_PORTS = {(8265, 8265), (52365, 52365)}


def _rs(values: dict | None = None) -> dict:
    return _one(_objects(_render(values)), "RayService")


def _pod_specs(rs: dict) -> list[dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container["env"]}


# ----- internal mTLS
def _frame_plane_handshake(files) -> list:
    """A real mTLS handshake between rpc.tls's Python ssl contexts (the frame listener's and its clients') holding
    `files`, a round trip through it; the server's certificate's SANs as the client saw it."""
    from elasticmoe.rpc import tls

    a, b = socket.socketpair()
    server: dict = {}
    thread = threading.Thread(target=lambda: server.update(s=tls.server_ssl_context(files).wrap_socket(
        b, server_side=True)))
    thread.start()
    with tls.client_ssl_context(files).wrap_socket(a, server_hostname=tls.SERVER_NAME) as client:
        thread.join(10)
        with server["s"]:
            client.sendall(b"ping")
            assert server["s"].recv(4) == b"ping" and server["s"].getpeercert()  # the client's, verified
        return client.getpeercert()["subjectAltName"]


def test_generated_certificate_serves_a_real_mtls_shard(tmp_path, monkeypatch):
    """The chart's generated CA and certificate (ECDSA P-256), mounted as the pods mount them, are what rpc.tls
    needs on both ends: a gRPC expert shard and the frame plane's ssl contexts."""
    from elasticmoe.experts.shard_server import start_server
    from elasticmoe.model import open_model
    from elasticmoe.model.experts import ExpertStore
    from elasticmoe.model.tiny import make_tiny_model
    from elasticmoe.rpc import tls
    from tests.test_tls import _health, _refused

    objs = _objects(_render())
    secret = _one(objs, "Secret")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    rs = _one(objs, "RayService")
    mount = _chart().values["internalTls"]["mountPath"]
    for spec, c in _containers(rs):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "internal-tls"]
        assert vol["secret"]["secretName"] == secret["metadata"]["name"]
        assert {"name": "internal-tls", "mountPath": mount, "readOnly": True} in c["volumeMounts"]
        env = _env(c)
        assert (env["ELASTICMOE_TLS_CA"], env["ELASTICMOE_TLS_CERT"], env["ELASTICMOE_TLS_KEY"]) == (
            f"{mount}/ca.crt", f"{mount}/tls.crt", f"{mount}/tls.key")
    assert _check_rayservice(rs).insecure_internal is False
    for name, data in secret["data"].items():
        (tmp_path / name).write_bytes(base64.b64decode(data))
    for env, name in ((tls.ENV_CA, "ca.crt"), (tls.ENV_CERT, "tls.crt"), (tls.ENV_KEY, "tls.key")):
        monkeypatch.setenv(env, str(tmp_path / name))
    files = open_model(str(make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=4)))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    server, _, port = start_server(store, "pod")
    try:
        assert _health(tls.channel(f"127.0.0.1:{port}")).ok
        _refused(tls.channel(f"127.0.0.1:{port}", files=tls.local_ca(tmp_path / "other")))
    finally:
        server.stop(None)
    assert ("DNS", "elasticmoe-internal") in _frame_plane_handshake(tls.tls_files())


def test_each_install_gets_its_own_ca():
    ca = lambda: _one(_objects(_render(fresh=True)), "Secret")["data"]["ca.crt"]  # noqa: E731
    assert ca() != ca()  # `helm template` has no cluster to look the old Secret up in


def test_existing_secret_and_cert_manager_sources():
    rs = _rs({"internalTls": {"source": "existingSecret", "existingSecret": "my-internal-tls"}})
    assert all(v["secret"]["secretName"] == "my-internal-tls" for spec in _pod_specs(rs)
               for v in spec["volumes"] if v["name"] == "internal-tls")
    assert [o for o in _objects(_render({"internalTls": {"source": "existingSecret", "existingSecret": "x"}}))
            if o["kind"] == "Secret"] == []
    issuer = {"issuerRef": {"name": "release-ca", "kind": "ClusterIssuer"}}
    objs = _objects(_render({"internalTls": {"source": "certManager", "certManager": issuer}}))
    cert = _one(objs, "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    assert {"server auth", "client auth"} <= set(cert["spec"]["usages"])
    assert "elasticmoe-internal" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"]["name"] == "release-ca"
    rs = _one(objs, "RayService")
    assert all(v["secret"]["secretName"] == cert["spec"]["secretName"] for spec in _pod_specs(rs)
               for v in spec["volumes"] if v["name"] == "internal-tls")


@pytest.mark.parametrize("bad, message", [
    ({"internalTls": {"source": "existingSecret"}}, "internalTls.existingSecret"),
    ({"internalTls": {"source": "certManager"}}, "issuerRef.name"),
    ({"networkPolicy": {"operatorFrom": [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]}},
     "namespaceSelector AND a podSelector"),
    ({"networkPolicy": {"operatorFrom": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"a": "b"}}}]}},
     "namespaceSelector AND a podSelector"),
])
def test_unsafe_values_fail_render(bad, message):
    with pytest.raises(helm.HelmError, match=message):
        _render(bad)


def test_insecure_internal_is_explicit():
    objs = _objects(_render({"internalTls": {"enabled": False}}))
    rs = _one(objs, "RayService")
    assert _check_rayservice(rs).insecure_internal is True
    assert [o for o in objs if o["kind"] == "Secret"] == []
    assert all("ELASTICMOE_TLS_CA" not in _env(c) for _, c in _containers(rs))


# ----- Ray, pods
@pytest.mark.parametrize("which", ["default", "gpu-production"])
def test_ray_token_auth_by_default(which):
    rs = _rs(None if which == "default" else _prod_values())
    _check_rayservice(rs)
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert all("RAY_AUTH_MODE" not in _env(c) for _, c in _containers(rs))  # KubeRay sets it and the token
    rs = _rs({"rayAuth": {"mode": "token", "secretName": "ray-token"}})
    _check_rayservice(rs)
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}


CACHES = ("CUDA_CACHE_PATH", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "ELASTICMOE_CACHE")


@pytest.mark.parametrize("values", [None, _prod_values()], ids=["default", "gpu-production"])
def test_every_cache_of_the_ray_containers_is_on_a_writable_mount(values):
    """Under the read-only root filesystem a cache left in the home directory is lost: CUDA's JIT cache
    (~/.nv/ComputeCache, the driver's compiled PTX) was, so every process compiled its kernels' PTX again."""
    for _, c in _containers(_rs(values)):
        env, mounts = _env(c), [m for m in c["volumeMounts"] if not m.get("readOnly")]
        for name in CACHES:
            assert any(env[name].startswith(m["mountPath"].rstrip("/") + "/") or env[name] == m["mountPath"]
                       for m in mounts), (c["name"], name, env[name])


@pytest.mark.parametrize("which", ["default", "gpu-production", "autoscaler+download"])
def test_read_only_root_and_no_worker_token(which):
    values = {"default": None, "gpu-production": _prod_values(),
              "autoscaler+download": {"rayAutoscaler": {"enabled": True},
                                      "model": {"path": "org/m", "revision": "main", "download": {"enabled": True}},
                                      "modelCache": {"type": "pvc"}}}[which]
    rs = _rs(values)
    _check_rayservice(rs)
    cluster = rs["spec"]["rayClusterConfig"]
    for spec in _pod_specs(rs):
        vols = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in vols["tmp"] and "emptyDir" in vols["cache"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}, c["name"]
    for _, c in _containers(rs):
        assert {"/tmp", "/var/cache/elasticmoe", _chart().values["tritonCache"]["mountPath"]} <= {
            m["mountPath"] for m in c["volumeMounts"]}
        assert _env(c)["ELASTICMOE_CACHE"] == "/var/cache/elasticmoe"
    assert all(g["template"]["spec"]["automountServiceAccountToken"] is False for g in cluster["workerGroupSpecs"])
    head = cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"]
    assert head is (which == "autoscaler+download" or bool((values or {}).get("rayAutoscaler", {}).get("enabled")))


def test_api_keys_from_a_secret():
    rs = _rs()
    assert all("ELASTICMOE_API_KEYS_FILE" not in _env(c) for _, c in _containers(rs))
    prod = _prod_values()
    rs = _rs(prod)
    name, key = prod["apiKeys"]["existingSecret"], prod["apiKeys"]["key"]
    for spec, c in _containers(rs):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
        assert vol["secret"]["secretName"] == name
        assert _env(c)["ELASTICMOE_API_KEYS_FILE"] == f"/etc/elasticmoe/api-keys/{key}"
    args = _check_rayservice(_rs({"model": {"servedName": "moe-prod"}}))
    assert args.served_model_name == "moe-prod" and args.api_keys == []  # keys never in the Serve config
    for name in ("org/moe:v1.2", "ft:moe-base:my-org::abc123", "MoE 模型"):  # the schema's pattern lets these by
        assert _check_rayservice(_rs({"model": {"servedName": name}})).served_model_name == name


# ----- NetworkPolicy
@pytest.mark.parametrize("which", ["default", "gpu-production"])
def test_network_policy_defaults(which):
    values = None if which == "default" else _prod_values()
    policy = _one(_objects(_render(values)), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    for rule in spec["ingress"]:
        assert rule.get("from"), f"an ingress rule open to every peer: {rule}"
        ranges = set(_port_ranges(rule))
        if ranges & DASHBOARD_PORTS:  # the dashboard (Jobs API): the operator, by namespace AND pod
            assert all(p["namespaceSelector"].get("matchLabels") and p["podSelector"].get("matchLabels")
                       for p in rule["from"]), rule
        if (8080, 8080) in ranges:
            assert all(p.get("namespaceSelector", {}).get("matchLabels") for p in rule["from"]), rule
    assert sum(bool(set(_port_ranges(r)) & DASHBOARD_PORTS) for r in spec["ingress"]) == 1
    egress = spec["egress"]
    assert any({(53, 53)} <= set(_port_ranges(r)) and r["to"] for r in egress)
    for rule in egress:
        assert rule.get("to") or rule.get("ports"), f"egress to anywhere on any port: {rule}"


def test_egress_follows_what_the_release_needs():
    def rules(values):
        return _one(_objects(_render(values)), "NetworkPolicy")["spec"]["egress"]

    base = len(rules(None))
    download = rules({"model": {"path": "org/m", "revision": "main", "download": {"enabled": True}},
                      "modelCache": {"type": "pvc"}})
    assert len(download) == base + 1 and _port_ranges(download[-1]) == [(443, 443)]
    store = rules({"networkPolicy": {"egress": {"modelStore": {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}],
                                                               "ports": [9000]}}}})
    assert store[-1] == {"ports": [{"protocol": "TCP", "port": 9000}], "to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}]}
    ft = rules({"gcsFaultTolerance": {"enabled": True, "redisAddress": "redis://redis.db.svc:6380"}})
    assert _port_ranges(ft[-1]) == [(6380, 6380)]
    assert {(443, 443), (6443, 6443)} == set(_port_ranges(rules({"rayAutoscaler": {"enabled": True}})[-1]))
    policy = _one(_objects(_render({"networkPolicy": {"egress": {"enabled": False}}})), "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"] and "egress" not in policy["spec"]


@pytest.mark.parametrize("kind", ["NodePort", "LoadBalancer"])
def test_a_service_for_outside_clients_needs_the_policy_to_admit_them(kind):
    """<fullname>-serve-svc of type NodePort / LoadBalancer takes clients from outside the cluster, which the
    NetworkPolicy's default serving peers (pods of the namespace) never admit."""
    with pytest.raises(helm.HelmError, match=re.escape(f"service.type {kind} serves clients outside the cluster")):
        _render({"service": {"type": kind}})
    clients = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    objs = _objects(_render({"service": {"type": kind}, "networkPolicy": {"servingFrom": clients}}))
    assert _one(objs, "RayService")["spec"]["serveService"]["spec"]["type"] == kind
    rules = _one(objs, "NetworkPolicy")["spec"]["ingress"]
    assert any(r.get("from") == clients and {"protocol": "TCP", "port": 8000} in r["ports"] for r in rules)
    _render({"service": {"type": kind}, "networkPolicy": {"enabled": False}})


def test_notes_tell_about_keys_and_mtls():
    notes = _render(_prod_values())["elasticmoe/templates/NOTES.txt"]
    assert 'Authorization: Bearer $KEY' in notes and "elasticmoe-api-keys" in notes and "mTLS" in notes
    notes = _render({"internalTls": {"enabled": False}})["elasticmoe/templates/NOTES.txt"]
    assert "WARNING" in notes and "plaintext" in notes and "Authorization" not in notes


# ----- docs/SECURITY.md's claims on the pods, the certificates and the policy that no test above held
@pytest.mark.parametrize("which", ["default", "gpu-production", "direct-grpc"])
def test_every_pod_runs_with_the_runtime_default_seccomp_profile(which):
    """SECURITY.md, Pods: "`RuntimeDefault` seccomp" (every pod of every group, the gateways' own included)."""
    values = {"default": None, "gpu-production": _prod_values(), "direct-grpc": {"directGrpc": {"enabled": True}}}
    rs = _rs(values[which])
    specs = _pod_specs(rs)
    assert len(specs) >= (3 if which == "direct-grpc" else 2)
    assert [s["securityContext"].get("seccompProfile") for s in specs] == [{"type": "RuntimeDefault"}] * len(specs)


def test_certificate_sources_are_the_kinds_the_doc_names():
    """SECURITY.md, "Where the certificates come from": generate makes ECDSA P-256 keys (Helm's genPrivateKey,
    genCAWithKey / genSignedCertWithKey), a CA of caValidityDays signing a certificate of validityDays that names
    `elasticmoe-internal` for server and client auth; cert-manager's is ECDSA with `rotationPolicy: Always`."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    secret = _one(_objects(_render()), "Secret")
    assert secret["metadata"]["name"].endswith("-internal-tls")  # `<fullname>-internal-tls`
    ca, leaf = (x509.load_pem_x509_certificate(base64.b64decode(secret["data"][n])) for n in ("ca.crt", "tls.crt"))
    for cert in (ca, leaf):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1), cert.subject
    leaf.verify_directly_issued_by(ca)
    days = _chart().values["internalTls"]["generate"]
    assert [(c.not_valid_after_utc - c.not_valid_before_utc).days for c in (ca, leaf)] == [
        days["caValidityDays"], days["validityDays"]]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["elasticmoe-internal", "localhost"]
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    issuer = {"issuerRef": {"name": "release-ca", "kind": "ClusterIssuer"}}
    cert = _one(_objects(_render({"internalTls": {"source": "certManager", "certManager": issuer}})), "Certificate")
    key = cert["spec"]["privateKey"]
    assert (key["algorithm"], key["rotationPolicy"]) == ("ECDSA", "Always")


def test_metrics_are_open_to_the_monitoring_namespace_only_by_default():
    """SECURITY.md, Metrics (8080): "NetworkPolicy: `metricsFrom` (default: the `monitoring` namespace)"."""
    policy = _one(_objects(_render()), "NetworkPolicy")
    (rule,) = [r for r in policy["spec"]["ingress"] if (8080, 8080) in _port_ranges(r)]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert rule["from"] == _chart().values["networkPolicy"]["metricsFrom"]


def test_a_chart_created_model_volume_is_kept_on_uninstall():
    """DEPLOY.md: "Remove the release with `helm uninstall moe -n llm` (a chart-created model PVC is kept)"."""
    (pvc,) = [o for o in _objects(_render({"modelCache": {"type": "pvc"}})) if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
