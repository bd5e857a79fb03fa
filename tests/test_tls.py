"""mTLS of the internal plane, without Ray: a real in-process expert shard refuses plaintext clients, clients
without a certificate and clients whose certificate another CA signed; it serves the release's own; the local CA
is made once by racing processes; a renewed certificate is served without a restart."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("tls") / "m", layers=2, experts=4)))
    return ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> tls.TlsFiles:
    """A second, unrelated CA with its own leaf: what an attacker on the pod network could make."""
    return tls.local_ca(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture
def shard(store):
    server, _, port = start_server(store, "s0")
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _health(ch: grpc.Channel, timeout: float = 3.0) -> pb.HealthResponse:
    try:
        return pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=timeout)
    finally:
        ch.close()


def _refused(ch: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _health(ch)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_shard_serves_clients_of_its_ca(shard):
    r = _health(tls.channel(shard))
    assert r.ok and r.shard_id == "s0"


def test_shard_refuses_plaintext(shard):
    _refused(grpc.insecure_channel(shard))


def test_shard_refuses_clients_without_a_certificate(shard):
    """Server-side TLS alone is not enough: the shard requires the client's certificate."""
    ca = tls.tls_files().ca.read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    _refused(grpc.secure_channel(shard, creds, options=[("grpc.ssl_target_name_override", tls.SERVER_NAME)]))


def test_shard_refuses_a_certificate_of_another_ca(shard, other_ca):
    # The other CA's client would not trust our shard either; make it trust ours, so the refusal is the shard's.
    ours = tls.tls_files()
    forged = tls.TlsFiles(ours.ca, other_ca.cert, other_ca.key)
    _refused(tls.channel(shard, files=forged))
    _refused(tls.channel(shard, files=other_ca))


def test_client_refuses_a_shard_of_another_ca(store, other_ca):
    """The gateway and controller check the shard too: a server with a foreign certificate gets nothing."""
    impostor = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_ExpertShardServicer_to_server(pb_grpc.ExpertShardServicer(), impostor)
    port = tls.add_port(impostor, "127.0.0.1:0", files=other_ca)
    impostor.start()
    try:
        _refused(tls.channel(f"127.0.0.1:{port}"))
    finally:
        impostor.stop(None)


def test_insecure_internal_is_explicit_and_warns(store, caplog):
    with caplog.at_level(logging.WARNING):
        server, _, port = start_server(store, "plain", insecure=True)
    try:
        assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)
        assert _health(tls.channel(f"127.0.0.1:{port}", insecure=True)).ok
        _refused(tls.channel(f"127.0.0.1:{port}"))  # an mTLS client does not fall back to plaintext
    finally:
        server.stop(None)


def test_files_from_the_environment(monkeypatch, tmp_path, other_ca, store):
    """ELASTICMOE_TLS_* (the Helm Secret's mount) replace the local CA; all three or none."""
    monkeypatch.setenv(tls.ENV_CA, str(other_ca.ca))
    with pytest.raises(ValueError, match=tls.ENV_CERT):
        tls.tls_files()
    monkeypatch.setenv(tls.ENV_CERT, str(other_ca.cert))
    monkeypatch.setenv(tls.ENV_KEY, str(tmp_path / "absent.key"))
    with pytest.raises(FileNotFoundError):
        tls.tls_files()
    monkeypatch.setenv(tls.ENV_KEY, str(other_ca.key))
    assert tls.tls_files() == other_ca
    server, _, port = start_server(store, "env")
    try:
        assert _health(tls.channel(f"127.0.0.1:{port}")).ok  # both sides from the environment
        _refused(tls.channel(f"127.0.0.1:{port}", files=tls.local_ca(tls.cache_dir() / "tls")))
    finally:
        server.stop(None)


def _live_files(tmp_path, monkeypatch):
    """A Secret-like directory of TLS files, named by ELASTICMOE_TLS_*, holding a first CA's files."""
    live = tmp_path / "live"
    live.mkdir()
    first = tls.local_ca(tmp_path / "first")
    _rotate(live, first)
    for env, name in ((tls.ENV_CA, "ca.crt"), (tls.ENV_CERT, "tls.crt"), (tls.ENV_KEY, "tls.key")):
        monkeypatch.setenv(env, str(live / name))
    return live, first


def _rotate(live, to) -> None:
    """Replace the files in `live` with `to`'s, each atomically (as a Secret update does)."""
    for name in ("ca.crt", "tls.crt", "tls.key"):
        shutil.copy(to.ca.parent / name, live / (name + ".new"))
        (live / (name + ".new")).replace(live / name)


def test_renewed_certificate_served_without_restart(tmp_path, store, other_ca, monkeypatch):
    """A Secret update (new CA bundle and leaf) reaches new connections of a running shard."""
    live, first = _live_files(tmp_path, monkeypatch)
    server, _, port = start_server(store, "rotating")
    address = f"127.0.0.1:{port}"
    try:
        assert _health(tls.channel(address, files=first)).ok
        _refused(tls.channel(address, files=other_ca))
        _rotate(live, other_ca)
        assert _health(tls.channel(address, files=other_ca)).ok
        _refused(tls.channel(address, files=first))
    finally:
        server.stop(None)


def test_clients_pick_up_a_renewed_certificate(tmp_path, store, other_ca, monkeypatch):
    """After a rotation to a new CA (server files and client files alike), the gateway's dispatcher opens new
    channels with the new files and reaches the shard, which serves its new certificate."""
    from elasticmoe.gateway.dispatcher import GrpcDispatcher

    live, first = _live_files(tmp_path, monkeypatch)
    server, _, port = start_server(store, "rotating")
    address = f"127.0.0.1:{port}"
    d = GrpcDispatcher(timeout_s=5)
    d.renewal.period_s = 0.0
    try:
        old = d._stub(address)
        assert old.Health(pb.HealthRequest(), timeout=5).ok
        time.sleep(0.01)  # a new modification time
        _rotate(live, other_ca)
        new = d._stub(address)
        assert new is not old and new.Health(pb.HealthRequest(), timeout=5).ok
        assert d._stub(address) is new  # unchanged files: the channel is kept
    finally:
        server.stop(None)


def test_racing_processes_make_one_ca(tmp_path):
    code = ("import sys; from pathlib import Path; from elasticmoe.rpc.tls import local_ca; "
            "sys.stdout.write(local_ca(Path(sys.argv[1])).ca.read_text())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ca")], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    cas = {p.communicate(timeout=120)[0] for p in procs}
    assert len(cas) == 1 and "BEGIN CERTIFICATE" in cas.pop()
    assert oct((tmp_path / "ca" / "tls.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_release_files_for_ray_up(tmp_path, store, monkeypatch):
    """`python -m elasticmoe.rpc.tls DIR` (cluster/*.yaml): node files without the CA's key, which work as
    ELASTICMOE_TLS_* on both ends."""
    out = subprocess.run([sys.executable, "-m", "elasticmoe.rpc.tls", str(tmp_path / "tls")], capture_output=True,
                         text=True, check=True).stdout
    node = tmp_path / "tls" / "node"
    assert sorted(p.name for p in node.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]
    assert f"{tls.ENV_CA}={node / 'ca.crt'}" in out
    for env, name in ((tls.ENV_CA, "ca.crt"), (tls.ENV_CERT, "tls.crt"), (tls.ENV_KEY, "tls.key")):
        monkeypatch.setenv(env, str(node / name))
    server, _, port = start_server(store, "node")
    try:
        assert _health(tls.channel(f"127.0.0.1:{port}")).ok
    finally:
        server.stop(None)


def test_frame_listener_keeps_its_certificate_while_the_files_are_half_updated(tmp_path, store, other_ca,
                                                                                 monkeypatch):
    """Files caught mid-rotation (a new certificate beside the old key) cannot make a TLS context: the shard's frame
    listener, as its gRPC server, keeps serving the certificate it has instead of refusing every new connection."""
    from elasticmoe.rpc import frame_socket, frames

    live, first = _live_files(tmp_path, monkeypatch)
    server, servicer, _ = start_server(store, "rotating")
    layer = store.spec.moe.moe_layers[0]
    good = frames.encode_request(1, layer, torch.zeros(1, store.spec.hidden_size), torch.full((1, 1), -1,
                                 dtype=torch.int32), torch.ones(1, 1))

    def answered(files: tls.TlsFiles) -> bool:
        with socket.create_connection(("127.0.0.1", servicer.frame_port), timeout=5) as raw:
            with tls.client_ssl_context(files).wrap_socket(raw, server_hostname=tls.SERVER_NAME) as s:
                s.sendall(good)
                return frames.decode_reply(next(frame_socket.FrameReader(s).frames())).code == 0

    try:
        assert answered(first)
        time.sleep(0.01)  # a new modification time
        shutil.copy(other_ca.cert, live / "tls.crt")  # the certificate renewed, its key not yet
        assert answered(first)
        _rotate(live, other_ca)  # the rotation done: the new files serve the next connection
        assert answered(other_ca)
    finally:
        server.stop(None)
