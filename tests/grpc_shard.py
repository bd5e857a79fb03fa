"""A real in-process gRPC expert shard (mTLS) over a tiny Mixtral's experts, module-scoped, and well-formed calls
to it with their single-process answers: the shard fuzz and stats tests' fixture."""

from __future__ import annotations

import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor

E, K = 8, 2


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("sf") / "m", layers=2, experts=E)))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layers = files.spec.moe.moe_layers
    store.load([(l, e) for l in layers for e in range(E)])
    server, servicer, port = start_server(store, "fuzz", max_rows=64)
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    yield {"address": f"127.0.0.1:{port}", "stub": pb_grpc.ExpertShardStub(ch),
           "raw": ch.unary_unary("/elasticmoe.internal.v1.ExpertShard/RunExperts"),
           "store": store, "files": files, "layers": layers, "hidden": files.spec.hidden_size}
    ch.close()
    server.stop(None)


def inputs(shard, seed: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A well-formed call's layer, hidden [T, H], topk ids [T, K] and weights [T, K]."""
    g = torch.Generator().manual_seed(seed)
    t, layer = 1 + seed % 7, shard["layers"][seed % len(shard["layers"])]
    hidden = torch.randn(t, shard["hidden"], generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    return layer, hidden, ids, torch.rand(t, K, generator=g)


def request(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> pb.RunExpertsRequest:
    return pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids.to(torch.int32)),
                                topk_weights=encode_tensor(weights))


def valid(shard, seed: int) -> tuple[pb.RunExpertsRequest, torch.Tensor]:
    """A well-formed request and the single-process answer [T, H]."""
    layer, hidden, ids, weights = inputs(shard, seed)
    ref = LocalDispatcher(shard["store"]).dispatch(layer, hidden, ids, weights).wait()
    return request(layer, hidden, ids, weights), ref


def check_valid(shard, seed: int) -> None:
    req, ref = valid(shard, seed)
    out = decode_tensor(shard["stub"].RunExperts(req, timeout=30).output)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-6)  # float64 partial sums
