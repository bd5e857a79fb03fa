"""The expert shards' ports: two shards of one node (one user, one network namespace: several shard replicas in a
worker pod, or `ray up` nodes) never share a port of ELASTICMOE_EXPERT_PORT_RANGE. gRPC turns SO_REUSEPORT on by
default, so a second shard's bind of a port the first serves succeeded, and the kernel spread the gateways' and the
controller's connections to either shard between both (both hold the release's certificate: mTLS passes)."""

from __future__ import annotations

import socket

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

    files = open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("ports") / "m", layers=2, experts=4)))
    return ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))


def _free_span(n: int) -> tuple[int, int]:
    """n consecutive ports free on 127.0.0.1 now (tried from a random ephemeral one)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            lo = s.getsockname()[1]
        if lo + n > 65535:
            continue
        socks = []
        try:
            for p in range(lo, lo + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return lo, lo + n - 1
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    pytest.skip("no span of free ports")


def _shard_id(port: int) -> str:
    with tls.channel(f"127.0.0.1:{port}") as ch:
        return pb_grpc.ExpertShardStub(ch).Health(pb.HealthRequest(), timeout=5).shard_id


def test_two_shards_of_a_node_take_distinct_ports(store, monkeypatch):
    lo, hi = _free_span(6)
    monkeypatch.setenv("ELASTICMOE_EXPERT_PORT_RANGE", f"{lo}-{hi}")
    a, sa, pa = start_server(store, "a")
    try:
        b, sb, pb_ = start_server(store, "b")
        try:
            ports = {pa, sa.frame_port, pb_, sb.frame_port}
            assert len(ports) == 4, f"shared ports: a {pa}/{sa.frame_port}, b {pb_}/{sb.frame_port}"
            assert all(lo <= p <= hi for p in ports)
            # every connection to a port reaches the shard that announced it
            assert {_shard_id(pa) for _ in range(8)} == {"a"}
            assert {_shard_id(pb_) for _ in range(8)} == {"b"}
        finally:
            b.stop(None).wait(10)
    finally:
        a.stop(None).wait(10)
