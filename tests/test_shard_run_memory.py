"""RunExperts when a call's tokens do not fit in memory: RESOURCE_EXHAUSTED naming the layer, the tokens and the bytes,
on every transport (it was INTERNAL, and the gateway took the shard for failed: reported, dead for the step, a single
copy's tokens left waiting failover_s for a table that never came). The gateway sends them to another copy; with none,
it ends that step at once, and the engine runs it in smaller parts (halves, a long prompt's chunk in pieces), ending
only a request that does not fit even in the smallest piece. Over a real shard in its own
process whose address space is capped (RLIMIT_AS) once warmed up, as in tests/test_shard_drop_memory.py: torch's CPU
allocator is refused by the kernel (ENOMEM), as on a full host."""

from __future__ import annotations

import math
import re
import time

import grpc
import pytest
import torch

from elasticmoe.engine.engine import Engine
from elasticmoe.engine.sampling import SamplingParams
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.engine.step_forward import MIN_PIECE_TOKENS
from elasticmoe.gateway.dispatcher import GrpcDispatcher, ShortOfMemory
from elasticmoe.gateway.routing import RoutingTable
from elasticmoe.gateway.transport import is_short, make_transport
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import frames
from elasticmoe.rpc.codec import decode_tensor
from elasticmoe.rpc.frames import ExpertRequest
from tests.capped_shard import CAP_ON_WORD, capped_shard
from tests.shard_util import Shards

E, INTER = 4, 8192  # float32 experts of 3 * 64 * 8192 * 4 bytes = 6 MiB
ROOM = 16 << 20  # what the shard may map beyond what it has once warmed up
SMALL, BIG = 4, 2048  # BIG tokens to one expert want gate_up [BIG, 2 * INTER] float32: 128 MiB, far beyond ROOM
WIRES = ["unary", "stream", "socket"]
GREEDY = SamplingParams(max_tokens=2, temperature=0)

SHARD = r"""
import json, resource, sys, threading, torch
from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.experts import ExpertStore

torch.set_num_threads(1)  # no intra-op threads to start once capped
threading.stack_size(256 << 10)  # threads started once capped (connections, streams) map 256 KiB stacks, not 8 MiB
files = open_model(sys.argv[1])
store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
store.load([(l, e) for l in files.spec.moe.moe_layers for e in range(files.spec.moe.num_experts)])
server, _, port = start_server(store, "capped")
""" + CAP_ON_WORD


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    return str(make_tiny_model("mixtral", tmp_path_factory.mktemp("oom") / "m", layers=2, experts=E,
                               intermediate=INTER))


@pytest.fixture(scope="module")
def capped(model):
    """(address, layers) of a shard process holding every expert, capped once each transport has been answered."""
    with capped_shard(SHARD, model, ROOM) as shard:
        layers = open_model(model).spec.moe.moe_layers
        for wire in WIRES:  # the server's threads and lazy set-up, before the cap
            t = make_transport(wire, insecure=False)
            assert _send(t, shard.address, layers[0], SMALL).output is not None
            t.close()
        shard.cap()
        yield shard.address, layers


def _inputs(n: int, experts: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [n, 64], ids [n, 2] (every token to `experts`), weights [n, 2]."""
    g = torch.Generator().manual_seed(n)
    return (torch.randn(n, 64, generator=g), torch.tensor([experts] * n, dtype=torch.int32),
            torch.rand(n, 2, generator=g))


def _send(t, address: str, layer: int, n: int):
    return t.send(address, lambda: ExpertRequest(layer, *_inputs(n)), 30).result(timeout=60)


def _table(addresses: list[str], layers: list[int]) -> RoutingTable:
    """Every expert on every one of `addresses` (s0, s1, ...), equal shares."""
    experts = [[(i, 1.0 / len(addresses)) for i in range(len(addresses))] for _ in range(E)]
    return RoutingTable.from_dict({"version": 1, "layers": {l: experts for l in layers},
                                   "shards": [{"id": f"s{i}", "address": a} for i, a in enumerate(addresses)]})


def _reference(model: str, layer: int, inputs) -> torch.Tensor:
    files = open_model(model)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(layer, e) for e in range(E)])
    return LocalDispatcher(store).dispatch(layer, *inputs).wait()


@pytest.mark.parametrize("wire", WIRES)
def test_a_call_out_of_memory_is_resource_exhausted_naming_layer_tokens_and_bytes(capped, model, wire):
    address, (layer, _) = capped
    t = make_transport(wire, insecure=False)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _send(t, address, layer, BIG)
        details = e.value.details()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), details)
        assert details.startswith(f"{frames.OUT_OF_MEMORY}: layer {layer}, {BIG} tokens, "), details
        asked = re.search(r"tokens, (\d+) bytes could not be allocated \(DefaultCPUAllocator: can't allocate memory: "
                          r"you tried to allocate (\d+) bytes", details)
        assert asked and asked[1] == asked[2] and int(asked[1]) > ROOM, details  # gate_up [BIG, 2I]: beyond ROOM
        assert is_short(e.value)
        out = _send(t, address, layer, SMALL)  # the shard serves on
        torch.testing.assert_close(decode_tensor(out.output).float(), _reference(model, layer, _inputs(SMALL)),
                                   rtol=1e-5, atol=1e-6)
    finally:
        t.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_call_out_of_memory_goes_to_another_copy_and_nothing_is_reported(capped, model, wire):
    """s0 (capped) and s1 (in-process) hold every expert: s0's half of a BIG step does not fit it, s1 computes it;
    s0 is suspected (other copies first for a while) but neither reported nor dead for the step."""
    address, (layer, _) = capped
    other = Shards(open_model(model), [list(range(E))])
    reported: list[str] = []
    # no hedging (its delay is 1 s before any round trip is measured): a capped shard slow to answer on a loaded
    # machine would be hedged onto s1, which then wins without a failover (seen once at a load average of 6.5)
    d = GrpcDispatcher(transport=wire, timeout_s=20, failover_s=10, hedge_min_s=60, on_failure=reported.append)
    try:
        d.set_table(_table([address, other.addresses[0]], [layer]))
        inputs = _inputs(BIG)
        out = d.dispatch(layer, *inputs).wait()
        torch.testing.assert_close(out, _reference(model, layer, inputs), rtol=1e-5, atol=1e-6)
        assert d.failovers >= 1 and set(d.shard_tokens) == {"s1"}, (d.failovers, d.shard_tokens)  # s0 served none
        assert not d._reporting and reported == [] and [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
        assert "s0" in d.suspects
    finally:
        d.close()
        other.close()


@pytest.mark.parametrize("wire", WIRES)
def test_with_no_other_copy_the_step_ends_at_once_and_the_shard_serves_on(capped, model, wire):
    """s0 holds the only copies: the BIG step ends ShortOfMemory at once (it waited failover_s for a table that could
    not come, and ended as any unavailable step), its public text naming neither the shard nor its address; s0 is
    not reported and the next, small step is served by it."""
    address, (layer, _) = capped
    reported: list[str] = []
    d = GrpcDispatcher(transport=wire, timeout_s=20, failover_s=10, on_failure=reported.append)
    try:
        d.set_table(_table([address], [layer]))
        t0 = time.perf_counter()
        with pytest.raises(ShortOfMemory, match=f"layer {layer}: no copy but on shards out of memory for this step "
                                                f"\\(s0: {frames.OUT_OF_MEMORY}: layer {layer}, ") as e:
            d.dispatch(layer, *_inputs(BIG)).wait()
        assert time.perf_counter() - t0 < 5, time.perf_counter() - t0
        assert "out of memory" in e.value.public and "s0" not in e.value.public and "127." not in e.value.public
        inputs = _inputs(SMALL)
        out = d.dispatch(layer, *inputs).wait()
        torch.testing.assert_close(out, _reference(model, layer, inputs), rtol=1e-5, atol=1e-6)
        assert not d._reporting and reported == [] and [f["dead"] for f in d.fault_log] == [], list(d.fault_log)
    finally:
        d.close()


def _serve(address: str, layers: list[int], model: str, min_piece: int | None = None):
    """A 1,500-token prompt and a 4-token one served together over s0 (the only copies, capped), with the default
    backoff: (their sequences, the engine, its forward runs, the engine steps until the short one was served)."""
    files = open_model(model)
    d = GrpcDispatcher(transport="socket", timeout_s=20, failover_s=10)
    try:
        d.set_table(_table([address], layers))
        engine = Engine(files, d, max_num_seqs=2, max_model_len=2048, micro_batches=1)
        if min_piece is not None:
            engine.forward.min_piece = min_piece
        seqs = [engine.add_request(name, ids, GREEDY) for name, ids in _prompts(files)]
        served = None
        while engine.has_work():
            engine.step()
            if seqs[1].finished and served is None:
                served = engine.steps
    finally:
        d.close()
    return seqs, engine, d.steps, served


def _prompts(files) -> list[tuple[str, list[int]]]:
    vocab = files.spec.vocab_size
    return [("big", [1 + i % (vocab - 1) for i in range(1500)]), ("small", [5, 6, 7, 8])]


def _alone(model: str, ids: list[int]) -> list[int]:
    """The greedy tokens of `ids` from an engine with every expert in-process, the prompt in one chunk."""
    files = open_model(model)
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load([(l, e) for l in files.spec.moe.moe_layers for e in range(E)])
    local = Engine(files, LocalDispatcher(store), max_num_seqs=1, max_model_len=2048)
    seq = local.add_request("alone", ids, GREEDY)
    while local.has_work():
        local.step()
    return seq.output_ids


def test_a_request_too_long_for_the_shard_runs_in_pieces(capped, model):
    """The 1,500-token prompt and the 4-token one share a step on s0: the step fails for its size and is run in
    halves at once (no retry at that size, whose backoff the short request would wait out too); the long
    prompt's chunk, failing alone, is cut to a first piece that fits (750, 375 fail; 188 runs), the rest runs in
    the next steps in chunks of that size (the budget held there), none failing. Both are served, their tokens
    those of an engine with every expert in-process; the short one in two steps, as alone (its prefill, a decode),
    with no backoff slept."""
    address, layers = capped
    (big, small), engine, runs, served = _serve(address, layers, model)
    assert (engine.step_retries, engine.failed_requests, served) == (0, 0, 2), (big.error, small.error, served)
    piece, tried = engine.forward.budget.tokens(), [1500]
    while tried[-1] > piece:  # the halving of the long chunk, down to the piece that fit
        tried.append((tried[-1] + 1) // 2)
    assert MIN_PIECE_TOKENS <= piece <= 375 and len(tried) <= 1 + math.log2(1500 / MIN_PIECE_TOKENS) + 1, tried
    # first step: 1504 and 1500 fail, 4 runs, then the long chunk's tries; then chunks of at most the piece (the
    # short request's decode beside the first of them), none failing; then the long request's decode
    after = 1 + math.ceil((1500 - piece - (piece - 1)) / piece)
    assert runs == 3 + (len(tried) - 1) + after + 1, (runs, tried)
    assert big.output_ids == _alone(model, big.prompt_ids) and small.output_ids == _alone(model, small.prompt_ids)


def test_a_request_that_does_not_fit_even_at_the_floor_ends(capped, model):
    """With pieces no smaller than 512 tokens (more than s0 holds: min_piece raised for the test, its default 16
    fits), the long prompt's chunk fails at 750 and 512 tokens and ends with the out-of-memory text, after 5 runs;
    the short request is served, exact, and the budget is left as it was (no piece fit)."""
    address, layers = capped
    (big, small), engine, runs, _ = _serve(address, layers, model, min_piece=512)
    assert isinstance(big.error, RequestFailed) and str(big.error) == ShortOfMemory.public, big.error
    assert (engine.step_retries, engine.failed_requests, engine.forward.budget.tokens()) == (0, 1, 2048)
    assert runs == 5 + 1, runs  # the first step's 5 (1504, 1500, 4, 750, 512), then the short one's decode
    assert small.error is None and small.output_ids == _alone(model, small.prompt_ids)
