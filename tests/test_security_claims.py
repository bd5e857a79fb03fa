"""docs/SECURITY.md's claims without a test of their own, in process (real sockets, real TLS with CAs made here, real
gRPC servers; no Ray): every HTTP route but /health needs a key, even under Serve's route prefix, and a body sent
without one is never read nor tokenized; the direct_grpc port refuses a message over 4 MiB before any handler runs;
a presented key is compared with every key; a shard's control RPCs refuse whoever holds no certificate of the CA;
the socket transport refuses a frame listener of another CA and follows a rotation to a new CA; everything binds
127.0.0.1 by default; the Python client speaks TLS to a TLS front door."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import grpc
import pytest
import torch
from fastapi.testclient import TestClient

import elasticmoe.gateway.auth as auth
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.socket_transport import SocketTransport
from elasticmoe.gateway.transport import TransportError
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from elasticmoe.rpc import tls, unix_socket
from elasticmoe.rpc.frame_listener import FrameListener
from tests.shard_util import E, Shards, _req, files, halves  # noqa: F401
from tests.test_api_keys import KEY, core, path  # noqa: F401

AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = [("GET", "/metrics", None), ("GET", "/version", None), ("GET", "/v1/models", None),
          ("POST", "/tokenize", {"prompt": "Hello"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
          ("POST", "/v1/completions", {"model": "mixtral", "prompt": "Hi", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"model": "mixtral", "max_tokens": 1,
                                            "messages": [{"role": "user", "content": "Hi"}]})]


# ----- HTTP: every route but /health
@pytest.mark.parametrize("method, route, body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_http_route_but_health_needs_a_key(core, method, route, body):  # noqa: F811
    http = TestClient(build_openai_app(core))
    r = http.request(method, route, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (route, r.text)
    assert http.request(method, route, json=body, headers=AUTH).status_code == 200, route


def _asgi(app, path: str, root: str = "", method: str = "GET", headers=()) -> tuple[int, list]:
    """One request straight into the ASGI app: (status, the receive() calls it made)."""
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b'{"prompt": "Hello"}', "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": root + path, "raw_path": (root + path).encode(), "root_path": root, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"4000000"), *headers],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], reads


def test_under_a_route_prefix_only_health_is_open_and_an_unkeyed_body_is_never_read(core):  # noqa: F811
    """Serve mounts the app under route_prefix (root_path): the open path is the prefix's /health, nothing else;
    /tokenize without a key reads none of its body (nothing buffered, nothing tokenized)."""
    app = build_openai_app(core)
    assert _asgi(app, "/health", "/elasticmoe")[0] == 200
    for path_ in ("/metrics", "/v1/models", "/health/", "/healthz", "/nothing-here"):
        assert _asgi(app, path_, "/elasticmoe")[0] == 401, path_
    status, reads = _asgi(app, "/tokenize", "/elasticmoe", "POST")
    assert status == 401 and reads == []
    status, reads = _asgi(app, "/tokenize", "/elasticmoe", "POST", [(b"authorization", f"Bearer {KEY}".encode())])
    assert status == 200 and reads  # the control: with the key the same request is read and answered


# ----- the direct_grpc port: 4 MiB, before any handler; without a key the message is not even read
def test_the_direct_port_refuses_a_message_over_4_mib_before_any_handler_runs(core):  # noqa: F811
    from elasticmoe.config import DirectGrpc

    ingress = DirectIngress(GenerationService(core), DirectGrpc(port=9100).host, 0, max_rpcs=4)
    try:
        before = dict(core.metrics.requests)
        with grpc.insecure_channel(ingress.address, options=[("grpc.max_send_message_length", -1)]) as ch:
            stub = gen_grpc.GenerationStub(ch)
            big = gen.GenerateRequest(prompt="x" * (4 * 1024 * 1024 + 1))
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(big, metadata=tuple((k.lower(), v) for k, v in AUTH.items()), timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(core.metrics.requests) == before  # refused by gRPC itself: the service never saw it
            with pytest.raises(grpc.RpcError) as e:  # no key: refused on its metadata, the message left unread
                stub.Generate(big, timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert core.metrics.requests[("grpc", "unauthenticated")] == before.get(("grpc", "unauthenticated"), 0) + 1
    finally:
        ingress.stop(0)


# ----- constant-time comparison
def test_a_presented_key_is_compared_with_every_key(monkeypatch):
    keys = ApiKeys([f"sk-key-{i:02d}-0123456789abcdef" for i in range(5)])
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented, ok in (("sk-key-00-0123456789abcdef", True), ("sk-key-04-0123456789abcdef", True),
                          ("sk-key-0", False), ("x" * 5000, False)):
        calls.clear()
        assert keys.valid(presented) is ok
        assert len(calls) == 5, presented  # no early exit on a match, whatever the key's length


# ----- the shards' control RPCs: only holders of a certificate of the release's CA
def _no_certificate(address: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=tls.tls_files().ca.read_bytes())
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)])


def test_control_rpcs_refuse_a_client_without_a_certificate_of_the_ca(files, halves, tmp_path):  # noqa: F811
    """LoadExperts, DropExperts, GetStats and RunExperts: plaintext, TLS without a client certificate, and a
    certificate of another CA (trusting ours) are all refused; the shard's experts stay as they were."""
    address, store, layer = halves.addresses[0], halves.stores[0], halves.layers[0]
    held = sorted(store.held())
    other = tls.local_ca(tmp_path / "other")
    refs = [pb.ExpertRef(layer=layer, expert=e) for e in range(E)]
    calls = [("LoadExperts", pb.LoadExpertsRequest(experts=refs, placement_version=99)),
             ("DropExperts", pb.DropExpertsRequest(experts=refs, placement_version=99)),
             ("GetStats", pb.GetStatsRequest()), ("RunExperts", pb.RunExpertsRequest())]
    for make in (lambda: grpc.insecure_channel(address), lambda: _no_certificate(address),
                 lambda: tls.channel(address, files=tls.TlsFiles(tls.tls_files().ca, other.cert, other.key))):
        with make() as ch:
            stub = pb_grpc.ExpertShardStub(ch)
            for name, request in calls:
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, name)(request, timeout=3)
                assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), name
    assert sorted(store.held()) == held and halves.servicers[0].placement_version != 99
    with tls.channel(address) as ch:  # the control: the release's certificate gets in
        assert pb_grpc.ExpertShardStub(ch).GetStats(pb.GetStatsRequest(), timeout=5).shard_id == "s0"


# ----- the socket transport (the default): the shard's frame listener must prove itself too
@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET"])
def test_the_socket_transport_refuses_a_frame_listener_of_another_ca(files, halves, tmp_path, family,
                                                                   monkeypatch):  # noqa: F811
    """A shard's Health points at a frame listener holding another CA's certificate (what a process on the shard's
    host could open), on its Unix socket or its TCP port: the gateway's TLS handshake fails, no frame is sent, and
    the call fails."""
    if family == "AF_INET":
        monkeypatch.setenv(unix_socket.ENV, "0")  # the gateway connects over TCP (a shard on another host)
    layer, servicer = halves.layers[0], halves.servicers[0]
    other = tls.local_ca(tmp_path / "other")  # its own certificate; it admits our clients (so the refusal is ours)
    impostor = FrameListener(servicer.serve_frames, "127.0.0.1", [0],
                             files=tls.TlsFiles(tls.tls_files().ca, other.cert, other.key))
    real = servicer.frame_port, servicer.frame_unix_path
    servicer.frame_port, servicer.frame_unix_path = impostor.port, impostor.unix_path
    calls, t = servicer.calls, SocketTransport()
    try:
        with pytest.raises(Exception, match="(?i)certificate"):
            t.send(halves.addresses[0], lambda: _req(files, layer), 5).result(timeout=10)
        assert servicer.calls == calls and t.families[halves.addresses[0]] == family
    finally:
        servicer.frame_port, servicer.frame_unix_path = real
        t.close()
        impostor.close().wait(10)


def _rotate(live, to: tls.TlsFiles) -> None:
    for src, name in ((to.ca, "ca.crt"), (to.cert, "tls.crt"), (to.key, "tls.key")):
        (live / (name + ".new")).write_bytes(src.read_bytes())
        (live / (name + ".new")).replace(live / name)


def test_the_socket_transport_follows_a_rotation_to_a_new_ca(files, tmp_path, monkeypatch):  # noqa: F811
    """Secret-like files (ELASTICMOE_TLS_*) swapped to a new CA's on both ends: the running shard serves the new
    certificate to new connections and the transport, at its next look, reconnects with the new files."""
    live = tmp_path / "live"
    live.mkdir()
    first, second = tls.local_ca(tmp_path / "first"), tls.local_ca(tmp_path / "second")
    _rotate(live, first)
    for env, name in ((tls.ENV_CA, "ca.crt"), (tls.ENV_CERT, "tls.crt"), (tls.ENV_KEY, "tls.key")):
        monkeypatch.setenv(env, str(live / name))
    shards, t = Shards(files, [list(range(E // 2))]), SocketTransport()
    address, layer = shards.addresses[0], shards.layers[0]
    try:
        assert t.send(address, lambda: _req(files, layer), 5).result(timeout=10).output.data
        old = t._conns[address]
        time.sleep(0.01)  # a new modification time
        _rotate(live, second)
        t.renewal.period_s = 0.0
        assert t.send(address, lambda: _req(files, layer, seed=1), 5).result(timeout=10).output.data
        assert t._conns[address] is not old
        stale = SocketTransport()  # a process still holding the first CA's files is refused now
        try:
            monkeypatch.setattr(tls, "tls_files", lambda: first)
            with pytest.raises(TransportError, match="(?i)certificate"):  # not any error: a refused handshake
                stale.send(address, lambda: _req(files, layer), 5).result(timeout=10)
        finally:
            stale.close()
    finally:
        t.close()
        shards.close()


# ----- bind addresses
def _listening(port: int) -> set[str]:
    """The local addresses listening on TCP `port` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    out = set()
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:  # 32-bit words, each in the host's (little-endian) order
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
                    ip = ipaddress.ip_address(raw)
                    out.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC's IPv6 socket for 127.0.0.1
    return out


def test_everything_binds_127_0_0_1_by_default(halves, monkeypatch):  # noqa: F811
    from elasticmoe.config import DirectGrpc
    from elasticmoe.experts.deployment import bind_host

    monkeypatch.delenv("ELASTICMOE_EXPERT_HOST", raising=False)
    assert bind_host() == "127.0.0.1" and DirectGrpc(port=9100).host == "127.0.0.1"
    port = int(halves.addresses[0].rsplit(":", 1)[1])
    assert _listening(port) == {"127.0.0.1"}  # the shard's gRPC server (start_server's default host)
    assert _listening(halves.servicers[0].frame_port) == {"127.0.0.1"}  # and its frame listener


# ----- the Python client behind a TLS front door
def test_the_python_client_speaks_tls_to_a_tls_front_door(core, tmp_path):  # noqa: F811
    """"The Python client takes `GenerationClient(address, api_key=..., tls=True)`": the gateway's own gRPC handlers
    served on a TLS port (as a TLS-terminating proxy would present them) answer a client given `tls` with the
    front door's CA, with the key; a plaintext client gets no answer there; `tls=True` (the system's roots) refuses a
    certificate of a CA it does not trust rather than sending in the clear."""
    from elasticmoe.client import GenerationClient

    ca = tls.local_ca(tmp_path / "front")  # its certificate names 127.0.0.1

    class TlsIngress(DirectIngress):
        @staticmethod
        async def _start(service, host, port, max_rpcs, _options):
            from elasticmoe.gateway.generation_service import GenerationServicer

            server = grpc.aio.server(maximum_concurrent_rpcs=max_rpcs)
            gen_grpc.add_GenerationServicer_to_server(GenerationServicer(service), server)
            creds = grpc.ssl_server_credentials([(ca.key.read_bytes(), ca.cert.read_bytes())])
            bound = server.add_secure_port(f"{host}:{port}", creds)
            await server.start()
            return server, bound

    ingress = TlsIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=4)
    clients = []
    try:
        good = GenerationClient(ingress.address, api_key=KEY, tls=ca.ca.read_bytes(), timeout_s=60)
        clients.append(good)
        assert good.generate("Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2
        for client in (GenerationClient(ingress.address, api_key=KEY, timeout_s=5),
                       GenerationClient(ingress.address, api_key=KEY, tls=True, timeout_s=5)):
            clients.append(client)
            with pytest.raises(grpc.RpcError) as e:
                client.generate("Hello", max_tokens=2, temperature=0)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        for client in clients:
            client.close()
        ingress.stop(0)


# ----- metrics
def test_no_prompt_text_reaches_the_metrics(core):  # noqa: F811
    """SECURITY.md, Metrics: "no prompt text in any metric": after served, refused and misrouted requests whose every
    free-text part (prompt, messages, stop, request id, model name, URL) carries a marker, the gateway's /metrics
    text, which counted them, holds no trace of it; every metric's labels are bounded names, not request text."""
    from tests.test_doc_names import _registered_metrics

    marker = "Zebracorn"
    http = TestClient(build_openai_app(core))
    before = http.get("/metrics", headers=AUTH).text
    bodies = [("/v1/completions", {"prompt": f"{marker} says", "max_tokens": 2, "stop": [marker],
                                   "user": marker}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": marker, "name": marker}],
                                        "max_tokens": 2}),
              ("/v1/completions", {"prompt": marker, "max_tokens": -1}),
              ("/v1/completions", {"prompt": marker, "model": marker}),
              ("/v1/completions", {"prompt": marker, marker: 1}),
              (f"/v1/{marker}", {"prompt": marker})]
    codes = [http.post(route, json=body, headers={**AUTH, "x-request-id": marker}).status_code
             for route, body in bodies]
    assert codes == [200, 200, 400, 404, 400, 404]
    text = http.get("/metrics", headers=AUTH).text
    assert text != before and "elasticmoe_requests_total" in text  # the requests were counted
    assert marker.lower() not in text.lower()
    labels = set().union(*_registered_metrics().values())
    assert labels <= {"api", "code", "expert", "kind", "layer", "le", "reason", "shard", "status"}, labels
