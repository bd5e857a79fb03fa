"""DropExperts when a layer's rebuild does not fit in memory: RESOURCE_EXHAUSTED naming the layer and the bytes (it
was UNKNOWN), the layer still serving its old weights; layers a drop empties go first, so what they free serves the
rebuilds. Over a real shard in its own process, whose address space is then capped (RLIMIT_AS) just above what it
maps: the rebuild's new storage (model.expert_weights.storage) is refused by the kernel (ENOMEM), as on a full host."""

from __future__ import annotations

import contextlib

import grpc
import pytest
import torch

from elasticmoe.model import open_model
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor
from tests.capped_shard import CAP_ON_WORD, capped_shard

E, INTER = 4, 8192  # float32 experts of 3 * 64 * 8192 * 4 bytes = 6 MiB: 24 MiB a layer
ROOM = 8 << 20  # what the shard may map beyond what it has: less than a rebuild keeping 3 experts (w13 alone 12 MiB)

SHARD = r"""
import json, resource, sys, threading, torch
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

torch.set_num_threads(1)  # no intra-op threads to start once capped
threading.stack_size(256 << 10)  # the server's workers, started as calls come, map 256 KiB stacks, not 8 MiB
files = open_model(sys.argv[1])
store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
store.load([(l, e) for l in files.spec.moe.moe_layers for e in range(files.spec.moe.num_experts)])
server, _, port = start_server(store, "capped")
""" + CAP_ON_WORD


@pytest.fixture
def capped(tmp_path):
    """(stub, layers) of a shard process holding every expert of the model's two MoE layers, capped once warmed up."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=2, experts=E, intermediate=INTER)
    with capped_shard(SHARD, path, ROOM) as shard:
        with contextlib.closing(tls.channel(shard.address, channel_options())) as ch:
            yield pb_grpc.ExpertShardStub(ch), shard, open_model(str(path)).spec.moe.moe_layers


def _run(stub, layer: int, ids: torch.Tensor) -> pb.RunExpertsResponse:
    """RunExperts for len(ids) tokens routed to `ids` [T, 2] of `layer` (same hidden states every time)."""
    hidden = torch.randn(len(ids), 64, generator=torch.Generator().manual_seed(0))  # [T, H]
    req = pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids),
                               topk_weights=encode_tensor(torch.full(ids.shape, 0.5)))
    return stub.RunExperts(req, timeout=30)


def _drop(stub, pairs) -> pb.DropExpertsResponse:
    return stub.DropExperts(pb.DropExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs]),
                            timeout=30)


def test_a_drop_whose_rebuild_does_not_fit_is_resource_exhausted_and_changes_nothing(capped):
    stub, shard, (a, b) = capped
    every = torch.tensor([[0, 1], [2, 3], [1, 3]], dtype=torch.int32)  # [T, k]: every expert of a layer
    kept = torch.tensor([[1, 2], [2, 3], [1, 3]], dtype=torch.int32)  # those of layer a that stay
    before = {name: decode_tensor(_run(stub, a, ids).output) for name, ids in (("every", every), ("kept", kept))}
    assert stub.Health(pb.HealthRequest(), timeout=10).ok and _drop(stub, []).dropped == 0  # warmed up
    shard.cap()

    with pytest.raises(grpc.RpcError) as e:  # a's 3 remaining experts (18 MiB) need more than ROOM
        _drop(stub, [(a, 0)])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
    assert f"layer {a}:" in e.value.details() and f"{3 * 3 * 64 * INTER * 4} bytes" in e.value.details()
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert sorted((r.layer, r.expert) for r in stats.held) == [(l, x) for l in (a, b) for x in range(E)]
    after = _run(stub, a, every)  # expert 0 still held and served, with its old weights
    assert not after.missing and torch.equal(decode_tensor(after.output), before["every"])

    # b emptied first: the 24 MiB it frees hold a's rebuild, asked first in the same call
    done = _drop(stub, [(a, 0)] + [(b, x) for x in range(E)])
    assert done.dropped == E + 1 and done.bytes_held == 3 * 3 * 64 * INTER * 4, done
    assert _run(stub, a, every).missing == [0]
    assert torch.equal(decode_tensor(_run(stub, a, kept).output), before["kept"])  # the copy served as before
