"""LoadExperts whose caller leaves mid-load (its deadline passes, or it cancels): the shard stops between experts and
takes the load back as a failed load is taken back (held experts and weight bytes as before; the old experts serve
on), so the shard agrees with the controller, which gave up on the load and counts it as not done. Over a real
in-process shard; the load is held at one expert's read until its client has gone and the shard has seen it go."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor

E, T = 4, 6
BEFORE = [(0, 0), (0, 1)]  # what the shard holds when the load comes
PAIRS = [(0, 2), (0, 3), (1, 0), (1, 1), (2, 0), (2, 1)]  # the load: layer 0 grows, layers 1 and 2 are new
HELD_AT = "model.layers.2.block_sparse_moe.experts.0.w1.weight"  # (2, 0)'s first read: layers 0 and 1 are loaded


class _HeldStore(ExpertStore):
    """An ExpertStore whose first read of HELD_AT waits until the test says the client has gone (`gone`) and the
    load has been told so where the server tells it (the `stop` it was given); `reached` once it waits."""

    def __init__(self, files):
        super().__init__(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
        self.reached, self.gone = threading.Event(), threading.Event()
        self.stop = None
        read = files.ckpt.read_into

        def read_into(name, out, index=None):
            if name == HELD_AT and not self.reached.is_set():
                self._hold()
            read(name, out, index=index)

        files.ckpt.read_into = read_into  # this test's own checkpoint

    def load(self, pairs, **kw):
        self.stop = kw.get("stop")
        return super().load(pairs, **kw)

    def _hold(self) -> None:
        self.reached.set()
        self.gone.wait(10)
        told = self.stop or (lambda: True)  # a load the server gives no way to ask goes on at once
        deadline = time.monotonic() + 10
        while not told() and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def shard(tmp_path):
    """(stub, store, reference store): a shard holding BEFORE, over a 3-layer tiny model of its own."""
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path / "m", layers=3, experts=E)))
    store = _HeldStore(files)
    store.load(BEFORE)
    ref = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    ref.load([(0, e) for e in range(E)])
    server, _, port = start_server(store, "load-cancel")
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    yield pb_grpc.ExpertShardStub(ch), store, ref
    ch.close()
    server.stop(None).wait(10)


def _load(pairs) -> pb.LoadExpertsRequest:
    return pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l, expert=e) for l, e in pairs])


def _pairs(stats: pb.GetStatsResponse) -> list[tuple[int, int]]:
    return [(r.layer, r.expert) for r in stats.held]


def _serves_the_old_experts(stub, ref: ExpertStore) -> None:
    """RunExperts on layer 0 with tokens routed to experts 0 and 1 (held before the load) gives the reference."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(T, ref.spec.hidden_size, generator=g)  # [T, H]
    ids = torch.tensor([[0, 1], [1, 0]] * (T // 2), dtype=torch.int32)  # [T, 2]
    weights = torch.rand(T, 2, generator=g)  # [T, 2]
    req = pb.RunExpertsRequest(layer=0, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids),
                               topk_weights=encode_tensor(weights))
    reply = stub.RunExperts(req, timeout=10)
    assert not reply.missing, reply.missing
    torch.testing.assert_close(decode_tensor(reply.output), ref.forward(0, hidden, ids, weights), rtol=0, atol=0)


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_load_whose_caller_left_is_taken_back(shard, how):
    """The caller leaves while (2, 0) is read, layers 0 and 1 already holding their new experts (served meanwhile).
    The load went on to its end: the shard held 6 experts no one had asked for any more (the controller, told
    DEADLINE_EXCEEDED, counts the load as failed), until its roll back's drop or that drop's retry came. It now stops
    before the next expert and takes back layers 0 and 1 as a failed load does: held and weight bytes as before, the
    old experts answer as before, and the same load asked again loads all of it."""
    stub, store, ref = shard
    before = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    call = stub.LoadExperts.future(_load(PAIRS), timeout=1.0 if how == "deadline" else 30)
    assert store.reached.wait(10), "the load never reached its held read"
    assert set(PAIRS[:4]) <= set(store.held())  # mid-load: layers 0 and 1 are published
    _serves_the_old_experts(stub, ref)
    if how == "cancel":
        assert call.cancel()
    else:
        assert call.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    store.gone.set()
    stub.DropExperts(pb.DropExpertsRequest(experts=[]), timeout=30)  # its turn comes once the load has ended
    after = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert _pairs(after) == _pairs(before) == BEFORE, _pairs(after)
    assert after.weight_bytes == before.weight_bytes, (after.weight_bytes, before.weight_bytes)
    assert store.snapshot(0).w13.shape[0] == 2 and store.snapshot(1) is None and store.snapshot(2) is None
    _serves_the_old_experts(stub, ref)
    again = stub.LoadExperts(_load(PAIRS), timeout=30)
    assert again.loaded == len(PAIRS) and again.bytes_held == 4 * before.weight_bytes
