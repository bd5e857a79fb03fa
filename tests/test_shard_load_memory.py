"""LoadExperts when torch's CPU allocator cannot give the expert-sized temporary a load reads through: RESOURCE_EXHAUSTED
(the shard short of memory, as a GPU's out of memory answers), with torch's reason; it was INTERNAL, read as a shard
failing. Nothing changes: the shard holds what it held. Over a real shard in its own process, capped (RLIMIT_AS) once
warmed up as in tests/test_shard_drop_memory.py: the layer's new bfloat16 storage (12 MiB) fits in ROOM, the float32
weight read before its conversion (8 MiB more) does not, and the kernel refuses torch's allocator (ENOMEM)."""

from __future__ import annotations

import contextlib
import os

import grpc
import pytest

from elasticmoe.model import open_model
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options
from tests.capped_shard import CAP_ON_WORD, MALLOC, capped_shard

H, INTER = 64, 32768  # one expert: w13 [2I, H] + w2 [H, I] bfloat16 = 12 MiB held; its gate [I, H] float32 read: 8 MiB
ROOM = 16 << 20  # what the shard may map beyond what it has once warmed up: the storage, not the temporary as well
TEMPORARY = INTER * H * 4

SHARD = r"""
import json, resource, sys, threading, torch
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

torch.set_num_threads(1)  # no intra-op threads to start once capped
threading.stack_size(256 << 10)  # the server's workers, started as calls come, map 256 KiB stacks, not 8 MiB
files = open_model(sys.argv[1])
store = ExpertStore(files.ckpt, files.names, files.spec, torch.bfloat16, torch.device("cpu"))  # the file: float32
server, _, port = start_server(store, "capped")
""" + CAP_ON_WORD
# one malloc arena (a thread's first call in a new one maps 64 MiB of address space) and a fixed mmap threshold (a
# freed temporary does not leave the next one room in the heap): what the cap leaves is what a load gets


@pytest.fixture
def capped(tmp_path):
    """(stub, layer) of a shard process holding nothing, capped once warmed up."""
    path = make_tiny_model("mixtral", tmp_path / "m", layers=1, experts=2, hidden=H, intermediate=INTER)
    with capped_shard(SHARD, path, ROOM, env={**os.environ, **MALLOC}) as shard:
        with contextlib.closing(tls.channel(shard.address, channel_options())) as ch:
            stub = pb_grpc.ExpertShardStub(ch)
            assert stub.Health(pb.HealthRequest(), timeout=10).ok and _drop(stub).dropped == 0  # warmed up
            shard.cap()
            yield stub, open_model(str(path)).spec.moe.moe_layers[0]


def _drop(stub) -> pb.DropExpertsResponse:
    return stub.DropExperts(pb.DropExpertsRequest(experts=[]), timeout=30)


def test_a_load_refused_by_the_cpu_allocator_is_resource_exhausted_and_changes_nothing(capped):
    stub, layer = capped
    with pytest.raises(grpc.RpcError) as e:
        stub.LoadExperts(pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=layer, expert=0)]), timeout=30)
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), details)
    assert f"DefaultCPUAllocator: can't allocate memory: you tried to allocate {TEMPORARY} bytes" in details, details
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert list(stats.held) == [] and stats.weight_bytes == 0, stats  # the load changed nothing
    assert stub.Health(pb.HealthRequest(), timeout=10).ok  # and the shard serves on
