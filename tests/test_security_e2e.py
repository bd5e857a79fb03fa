"""End to end, on a real local cluster: every listening socket of the cluster's processes (read from /proc) is on
127.0.0.1 but Serve's own wildcard binds; the expert shards serve mTLS only, on their gRPC port and on their frame
listener (the socket transport's); the API refuses requests without a key (HTTP 401, gRPC UNAUTHENTICATED) and
serves them with one; no checkpoint path reaches clients."""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from elasticmoe.client import GenerationClient
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frame_socket, frames, tls
from tests.serving_util import GRPC, app_entry, deploy, handle

pytestmark = pytest.mark.e2e
APP, KEY = "sec", "sk-e2e-0123456789abcdef0123"
DIRECT_PORT = 9101  # direct_grpc: the gateway replica's own gRPC port
HTTP = f"http://127.0.0.1:8000/{APP}"
RAY_MARKERS = ("gcs_server", "raylet", "ray::", "ray/dashboard", "ray/_private", "default_worker.py", "ray/autoscaler")


# ----- /proc: listening TCP sockets per process
def _addr(hex_addr: str) -> tuple[str, int]:
    """'0100007F:1F90' (IPv4) or 32 hex digits + port (IPv6), as /proc/net/tcp{,6} write them."""
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-order
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every socket in LISTEN state (st 0A) in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":
                out[int(f[9])] = _addr(f[1])
    return out


def cluster_processes() -> dict[int, str]:
    """pid -> command line of this user's Ray processes (GCS, raylet, dashboard, agents, workers, replicas)."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if d.stat().st_uid != os.getuid():
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(m in cmd for m in RAY_MARKERS):
            procs[int(d.name)] = cmd
    return procs


def listeners() -> list[tuple[int, str, str, int]]:
    """(pid, command line, address, port) of every socket a cluster process listens on."""
    socks, out = listening_sockets(), []
    for pid, cmd in cluster_processes().items():
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        inodes = set()
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        out += [(pid, cmd, *socks[i]) for i in inodes if i in socks]
    return out


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _serve_wildcard(cmd: str, port: int) -> bool:
    """Ray Serve binds these on every interface and offers no host option (docs/SECURITY.md): its gRPC proxy
    on grpc_options.port, and each replica's inter-deployment gRPC server (an ephemeral port)."""
    return ("ProxyActor" in cmd and port == 9000) or "ServeReplica" in cmd


# ----- the cluster
@pytest.fixture(scope="module")
def secured(ray_cluster, tiny_models, tmp_path_factory):
    entry = app_entry(APP, tiny_models["mixtral"], 2, api_keys=[KEY], direct_grpc={"port": DIRECT_PORT})
    deploy(ray_cluster, [entry], tmp_path_factory.mktemp("sec") / "serve.yaml")
    status = handle("Controller", APP).status.remote().result(timeout_s=60)
    return [s["address"] for s in status["shards"]]


def test_every_listener_is_loopback_or_serves_own(secured):
    found = listeners()
    assert found, "no listening socket found for the cluster's processes"
    ports = {port for _, _, _, port in found}
    assert {6379, 8265, 8000, 9000} <= ports, sorted(ports)  # GCS, dashboard, HTTP proxy, gRPC proxy
    bound = {(addr, port) for _, _, addr, port in found}
    for address in secured:  # the expert shards: on 127.0.0.1, listening; their frame listeners beside them
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) in ports, address
        frame_port = _health(address).frame_port
        assert frame_port and ("127.0.0.1", frame_port) in bound, (address, frame_port, sorted(bound))
    exposed = [(pid, cmd[:120], addr, port) for pid, cmd, addr, port in found
               if not _loopback(addr) and not _serve_wildcard(cmd, port)]
    assert exposed == [], "listening beyond 127.0.0.1:\n" + "\n".join(map(str, exposed))
    assert DIRECT_PORT in ports, sorted(bound)  # the gateway's own port (direct_grpc; gRPC binds ::ffff:127.0.0.1)
    for pid, cmd, addr, port in found:  # HTTP proxy, dashboard (Jobs API), direct port: never on a wildcard
        if port in (8000, 8265, 6379, DIRECT_PORT):
            assert _loopback(addr), (pid, cmd[:120], addr, port)


def _health(address: str) -> pb.HealthResponse:
    with tls.channel(address) as ch:  # the cluster's local CA: same ELASTICMOE_CACHE as this process
        return pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=10)


def _frame_answer(host: str, port: int, secure: bool) -> bytes:
    """A request frame (layer 0, hidden [1, 1]: refused by the shard's checks) to a frame listener: with mTLS, the
    reply frame; in plaintext, the first bytes that come back (b"" when the connection just ends)."""
    probe = frames.encode_request(1, 0, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1))
    s = socket.create_connection((host, port), timeout=5)
    if secure:
        s = tls.client_ssl_context().wrap_socket(s, server_hostname=tls.SERVER_NAME)
    with s:
        s.sendall(probe)
        if secure:
            return bytes(next(frame_socket.FrameReader(s).frames()))
        try:
            return s.recv(64)
        except (socket.timeout, ConnectionError):
            return b""


def test_the_test_cluster_runs_without_a_log_monitor(secured):
    """conftest starts the session's cluster with `--include-log-monitor=false` (nothing reads what it forwards to
    drivers; it polled every worker's log files, ~45-77 s of CPU an e2e run): no such process, the rest running."""
    cmds = list(cluster_processes().values())
    assert any("raylet" in c for c in cmds) and any("ServeReplica" in c for c in cmds), cmds
    assert not any("log_monitor.py" in c for c in cmds), [c for c in cmds if "log_monitor" in c]


def test_shards_speak_mtls_only(secured):
    for address in secured:
        health = _health(address)
        assert health.ok
        host = address.rsplit(":", 1)[0]
        reply = frames.decode_reply(_frame_answer(host, health.frame_port, secure=True))  # the release's CA: served
        assert reply.id == 1 and reply.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], reply
        plain = _frame_answer(host, health.frame_port, secure=False)  # nothing, or a TLS alert: never a frame
        assert not plain.startswith(frames.encode_reply(1)[:3]), plain  # a reply frame's first bytes
        with grpc.insecure_channel(address) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=5)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:  # raw bytes: no gRPC answer
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            s.settimeout(5)
            try:
                data = s.recv(64)
            except (socket.timeout, ConnectionError):
                data = b""
            assert not data.startswith(b"\x00\x00"), "a plaintext HTTP/2 frame came back"


def _http(path: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(HTTP + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_http_needs_the_key(secured, tiny_models):
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    for key in (None, "sk-wrong-wrong-wrong-wrong"):
        for path, b in (("/v1/completions", body), ("/v1/models", None)):
            status, out = _http(path, key, b)
            assert status == 401 and out["error"]["code"] == "invalid_api_key", (path, key, out)
    assert _http("/health")[0] == 200
    status, out = _http("/v1/completions", KEY, body)
    assert status == 200 and out["usage"]["completion_tokens"] == 2
    status, out = _http("/v1/models", KEY)
    assert status == 200 and [m["id"] for m in out["data"]] == [Path(tiny_models["mixtral"]).name]
    assert str(tiny_models["mixtral"]) not in json.dumps(out)


@pytest.mark.parametrize("address", [GRPC, f"127.0.0.1:{DIRECT_PORT}"], ids=["serve-proxy", "direct-port"])
def test_grpc_needs_the_key(secured, address):
    for key in ("", "sk-wrong-wrong-wrong-wrong"):
        client = GenerationClient(address, app=APP, api_key=key)
        try:
            with pytest.raises(grpc.RpcError) as e:
                client.generate("Hello", max_tokens=2, temperature=0)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(client.stream("Hello", max_tokens=2, temperature=0))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            client.close()
    client = GenerationClient(address, app=APP, api_key=KEY)
    try:
        assert client.generate("Hello", max_tokens=2, temperature=0).usage.completion_tokens == 2
    finally:
        client.close()



def _status_while_sending(head: bytes, chunk: bytes, most: int) -> int:
    """Send `head` then up to `most` bytes in `chunk`s on a raw connection to Serve's HTTP proxy, until it answers
    or stops reading (a send that waits 5 s); its status code (0: no answer)."""
    with socket.create_connection(("127.0.0.1", 8000), timeout=60) as s:
        s.sendall(head)
        sent = 0
        while chunk and sent < most and not select.select([s], [], [], 0)[0]:
            s.settimeout(5)
            try:
                s.sendall(chunk)  # blocking: a chunk goes whole or the sending stops (no torn chunk framing)
            except (TimeoutError, ConnectionError):
                break
            sent += len(chunk)
        s.settimeout(60)
        got = b""
        while b"\r\n" not in got:
            more = s.recv(4096)
            if not more:
                break
            got += more
    return int(got.split(b" ")[1]) if got.startswith(b"HTTP/") else 0


def test_the_proxy_refuses_a_keyless_oversized_body(secured):
    """Serve's HTTP proxy held a request's whole body before the gateway's key check (401): the BodyCap hook, named
    in RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH where the cluster starts, answers 413 in the proxy, for a
    Content-Length over 4 MiB before any of the body (a 401 there means the hook is not running), and for a chunked
    body once 4 MiB came, unless the gateway's 401 came first (an idle cluster gives the request a place at once)."""
    path = f"/{APP}/v1/completions".encode()
    head = b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    assert _status_while_sending(head + b"Content-Length: %d\r\n\r\n" % (5 << 20), b"", 0) == 413
    chunk = b"%x\r\n" % (1 << 16) + b"y" * (1 << 16) + b"\r\n"
    assert _status_while_sending(head + b"Transfer-Encoding: chunked\r\n\r\n", chunk, 16 << 20) in (401, 413)
    assert _http("/health")[0] == 200
