"""In-process expert shards over real gRPC for the transport and failover tests: a tiny checkpoint (`files`), the
shards holding chosen experts (Shards), step inputs and their single-process reference."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc.frames import ExpertRequest

E, K, T = 8, 2, 24


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("fo") / "m", layers=2, experts=E)))


class Shards:
    """In-process expert shards on 127.0.0.1, each holding the given experts of every MoE layer; `options`: shard
    index -> start_server's keyword arguments for that shard."""

    def __init__(self, files, holdings: list[list[int]], options: dict[int, dict] | None = None):
        self.files = files
        self.layers = files.spec.moe.moe_layers
        self.stores, self.servers, self.servicers, self.addresses = [], [], [], []
        for i, experts in enumerate(holdings):
            store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
            store.load([(l, e) for l in self.layers for e in experts])
            server, servicer, port = start_server(store, f"s{i}", **(options or {}).get(i, {}))
            self.stores.append(store)
            self.servers.append(server)
            self.servicers.append(servicer)
            self.addresses.append(f"127.0.0.1:{port}")

    def table(self, copies: dict[int, list[int]], version: int = 1, alive: list[int] | None = None,
              epoch: str = "") -> RoutingTable:
        idx = alive if alive is not None else list(range(len(self.addresses)))
        pos = {s: i for i, s in enumerate(idx)}
        experts = [[(pos[s], 1.0 / len(copies[e])) for s in copies[e] if s in pos] for e in range(E)]
        return RoutingTable.from_dict({"version": version, "epoch": epoch, "layers": {l: experts for l in self.layers},
                                       "shards": [{"id": f"s{i}", "address": self.addresses[i]} for i in idx]})

    def close(self):
        """Stop every server and wait until they have (grpc threads still stopping at interpreter exit abort it)."""
        for stopped in [s.stop(None) for s in self.servers]:
            stopped.wait(10)


def assert_two_shards_match_in_process(llm, prompts: list[str], max_tokens: int) -> None:
    """`llm`'s model in an engine whose experts 0-3 sit on one in-process gRPC shard and 4-7 on another: the greedy
    tokens of `llm` in process, both shards serving and no failover."""
    from elasticmoe import SamplingParams
    from elasticmoe.engine.engine import Engine

    shards, d = Shards(llm.files, [list(range(0, 4)), list(range(4, 8))]), GrpcDispatcher(timeout_s=10)
    try:
        d.set_table(shards.table({e: [e // 4] for e in range(E)}))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine = Engine(llm.files, d, max_num_seqs=4, tokenizer=llm.tokenizer, pipeline_min_tokens=2)
        seqs = [engine.add_request(f"p{i}", llm.encode(p), params) for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        assert [s.output_ids for s in seqs] == [o.token_ids for o in llm.generate(prompts, params)]
        assert set(d.shard_tokens) == {"s0", "s1"} and d.failovers == 0
    finally:
        d.close()
        shards.close()


def _inputs(files, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, files.spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    return hidden, ids, weights


def _reference(files, layer, hidden, ids, weights):
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(layer, e) for e in range(E)])
    return LocalDispatcher(store).dispatch(layer, hidden, ids, weights).wait()


def _run(d: GrpcDispatcher, layer: int, inputs) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = d.dispatch(layer, *inputs).wait()
    return out, time.perf_counter() - t0


ALL_BOTH = {e: [0, 1] for e in range(E)}
SPLIT = {e: [e * 2 // E] for e in range(E)}


@pytest.fixture
def pair(files):
    """Two shards each holding every expert."""
    shards = Shards(files, [list(range(E)), list(range(E))])
    yield shards
    shards.close()


@pytest.fixture(params=["unary", "socket"])
def transport(request) -> str:
    """A dispatcher test over the unary transport and over the socket transport (the deployed default, whose
    waiting caller reads the answers itself)."""
    return request.param


@pytest.fixture
def halves(files):
    """Two shards, shard 0 holding experts [0, E/2) and shard 1 the rest."""
    shards = Shards(files, [list(range(E // 2)), list(range(E // 2, E))])
    yield shards
    shards.close()


def _req(files, layer: int, rows: int = 4, seed: int = 0) -> ExpertRequest:
    """rows tokens routed to experts [0, E/2) (what halves' shard 0 holds)."""
    hidden, ids, weights = _inputs(files, seed)
    return ExpertRequest(layer, hidden[:rows], (ids[:rows] % (E // 2)).to(torch.int32), weights[:rows], 3)


def answer_within(t, address: str, build, seconds: float = 5.0):
    """t.send(address, build)'s answer, asked again every 50 ms while the call fails (a place not yet free after a
    connection or stream ended), for up to `seconds`; the last failure is raised after that."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return t.send(address, build, 5).result(timeout=10)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def gated_health(monkeypatch, shard_id: str) -> threading.Event:
    """Shard `shard_id`, started after this, answers Health once the Event is set (a busy pool, say)."""
    from elasticmoe.experts.server import ExpertServicer

    health, gate = ExpertServicer.Health, threading.Event()

    def gated(self, request, context):
        if self.shard_id == shard_id:
            gate.wait(10)
        return health(self, request, context)
    monkeypatch.setattr(ExpertServicer, "Health", gated)  # before the servers register their handlers
    return gate
