"""Micro-batch ping-pong: same outputs for 1, 2 and 3 micro-batches, and the order that overlaps expert calls."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from elasticmoe import LLM, SamplingParams
from elasticmoe.config import Limits
from elasticmoe.model.attention import KVCache
from elasticmoe.model.batch import build_batch
from elasticmoe.model.pipeline import default_micro_batches, micro_batch_count, ping_pong, split_even
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

PROMPTS = ["Hi", "A much longer prompt about the mixture of experts", "Once upon a time", "Zebra crossing",
           "The quick brown fox"]
FAMILIES = ["deepseek_v3", "qwen2_moe", "mixtral", "longcat_flash"]


@pytest.fixture(scope="module")
def llms(tiny_models, tmp_path_factory):
    out = {f: LLM(str(tiny_models[f]), dtype="float32") for f in FAMILIES[:3]}
    longcat = make_family_checkpoint("longcat_flash", tmp_path_factory.mktemp("lc") / "m",
                                     case=MORE_CASES["longcat_flash"])
    out["longcat_flash"] = LLM(str(longcat), dtype="float32")
    return out


class Deferred:
    """Like a remote dispatcher: dispatch returns at once, the experts run on wait(). Logs each call."""

    remote = True

    def __init__(self, store):
        self.store, self.log, self.calls = store, [], 0

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        call, self.calls = self.calls, self.calls + 1
        self.log.append(("dispatch", layer, call))
        outer = self

        class Later:
            def wait(self):
                outer.log.append(("wait", layer, call))
                return outer.store.forward(layer, hidden, topk_ids, topk_weights).to(hidden.dtype)
        return Later()


def _steps(llm):
    """Two steps of five sequences: their prompts (prefill), then one new token each (decode)."""
    ids = [llm.encode(p) for p in PROMPTS]
    return [[(s, 0, t) for s, t in enumerate(ids)], [(s, len(t), [t[-1]]) for s, t in enumerate(ids)]]


def _run(llm, n: int, alone: bool) -> torch.Tensor:
    """All tokens' final hidden states [T, H] of both steps, cut into n micro-batches: pipelined or each alone."""
    model, spec = llm.engine.model, llm.engine.spec
    cache = KVCache(spec, len(PROMPTS), 64, torch.float32, torch.device("cpu"))
    out = []
    for chunks in _steps(llm):
        parts = [build_batch(chunks[a:b], torch.device("cpu"), cache.table)
                 for a, b in split_even([len(c[2]) for c in chunks], n)]
        if alone:
            out += [model.forward(p, cache, Deferred(llm.store), all_tokens=True) for p in parts]
        else:
            out += model.forward_pipelined(parts, cache, Deferred(llm.store), all_tokens=True)
    return torch.cat(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_micro_batches_give_the_same_outputs(family, llms):
    """Pipelined = each micro-batch run alone, bit for bit (the schedule only reorders independent work). Across
    1, 2 and 3 micro-batches, float32 rounding may differ (GEMMs and the decode attention see other row counts,
    the experts other token groups): within 1e-5 relative, and the same greedy token at every position."""
    llm = llms[family]
    one = _run(llm, 1, alone=False)
    logits_one = llm.engine.model.logits(one)
    piped = {n: _run(llm, n, alone=False) for n in (2, 3)}
    assert torch.equal(piped[3], _run(llm, 3, alone=True))  # a first, a middle and a last micro-batch
    for out in piped.values():
        assert float((out - one).abs().max() / one.abs().max()) < 1e-5
        assert torch.equal(llm.engine.model.logits(out).argmax(-1), logits_one.argmax(-1))


@pytest.mark.parametrize("n", [2, 3])
def test_every_dense_stage_overlaps_the_other_micro_batches_calls(n, llms):
    """Mixtral (every layer sparse): each wait() but the last n-1 finds n calls in flight -- one per micro-batch,
    the waiter's and the others' -- and pre_{l+1}(A) dispatches before B's layer-l experts are waited for.
    The previous schedule (pre(A) pre(B) post(A) post(B)) found one call in flight at B's wait."""
    llm = llms["mixtral"]
    model = llm.engine.model
    chunks = _steps(llm)[0]
    cache = KVCache(llm.engine.spec, 8, 64, torch.float32, torch.device("cpu"))
    parts = [build_batch(chunks[a:b], torch.device("cpu"), cache.table)
             for a, b in split_even([len(c[2]) for c in chunks], n)]
    d = Deferred(llm.store)
    model.forward_pipelined(parts, cache, d)
    in_flight, seen = set(), []
    for kind, layer, call in d.log:
        if kind == "dispatch":
            in_flight.add(call)
        else:
            seen.append(len(in_flight))
            in_flight.remove(call)
    layers = len(model.layers)
    assert len(seen) == n * layers and seen[:-(n - 1)] == [n] * (n * layers - n + 1)
    at = {(kind, layer, call % n): i for i, (kind, layer, call) in enumerate(d.log)}  # calls go A, B, ... per layer
    for layer in range(layers - 1):
        assert at["dispatch", layer + 1, 0] < at["wait", layer, 1]


class GatedRemote:
    """Experts computed on a pool thread, like a remote shard; B's layer-l answer is held back until A's layer-l+1
    call has arrived (at most `hold_s`). A schedule that needs B's layer-l output first stalls `hold_s`."""

    remote = True

    def __init__(self, store, num_layers: int, hold_s: float = 5.0):
        self.store, self.layers, self.hold_s, self.pool = store, num_layers, hold_s, ThreadPoolExecutor(4)
        self.calls: dict[int, int] = {}  # layer -> calls so far (0: A, 1: B)
        self.sent: dict[tuple[int, int], threading.Event] = {}
        self.done: dict[tuple[int, int], float] = {}  # (layer, micro-batch) -> monotonic time its answer was ready
        self.dispatched: dict[tuple[int, int], float] = {}
        self.stalled = 0

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        mb = self.calls.get(layer, 0)
        self.calls[layer] = mb + 1
        self.dispatched[layer, mb] = time.monotonic()
        self.sent.setdefault((layer, mb), threading.Event()).set()
        nxt = self.sent.setdefault((layer + 1, 0), threading.Event())
        future = self.pool.submit(self._run, layer, mb, nxt, hidden, topk_ids, topk_weights)
        return type("Call", (), {"wait": lambda _: future.result()})()

    def _run(self, layer, mb, nxt, hidden, topk_ids, topk_weights):
        out = self.store.forward(layer, hidden, topk_ids, topk_weights).to(hidden.dtype)
        if mb == 1 and layer + 1 < self.layers and not nxt.wait(self.hold_s):
            self.stalled += 1
        self.done[layer, mb] = time.monotonic()
        return out


def test_pre_of_next_layer_runs_while_other_micro_batch_experts_compute(llms):
    """With experts on another thread: pre_{l+1}(A) is dispatched while B's layer-l experts are still running,
    for every layer boundary, with no stall; outputs equal the in-thread run's."""
    llm = llms["mixtral"]
    model = llm.engine.model
    chunks = _steps(llm)[0]
    table = KVCache(llm.engine.spec, 8, 64, torch.float32, torch.device("cpu")).table  # each cache's alike (static)
    parts = [build_batch(chunks[a:b], torch.device("cpu"), table)
             for a, b in split_even([len(c[2]) for c in chunks], 2)]
    gated = GatedRemote(llm.store, len(model.layers))
    t0 = time.monotonic()
    out = model.forward_pipelined(parts, KVCache(llm.engine.spec, 8, 64, torch.float32, torch.device("cpu")),
                                  gated, all_tokens=True)
    assert gated.stalled == 0 and time.monotonic() - t0 < gated.hold_s
    for layer in range(len(model.layers) - 1):
        assert gated.dispatched[layer + 1, 0] < gated.done[layer, 1]
    ref = model.forward_pipelined(parts, KVCache(llm.engine.spec, 8, 64, torch.float32, torch.device("cpu")),
                                  Deferred(llm.store), all_tokens=True)
    assert len(out) == len(ref) == len(parts) == 2, (len(out), len(ref), len(parts))
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_engine_with_three_micro_batches_generates_llm_tokens(llms):
    """Engine steps cut into 3 micro-batches (remote-like dispatcher) give LLM.generate's greedy tokens."""
    from elasticmoe.engine.engine import Engine

    llm = llms["qwen2_moe"]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = Engine(llm.files, Deferred(llm.store), max_num_seqs=8, tokenizer=llm.tokenizer, pipeline_min_tokens=2,
                    micro_batches=3)
    seqs = [engine.add_request(f"p{i}", llm.encode(p), params) for i, p in enumerate(PROMPTS)]
    while engine.has_work():
        engine.step()
    assert engine.dispatcher.log.count(("wait", 0, 2)) == 1  # the first step's third call: 3 micro-batches
    assert [s.output_ids for s in seqs] == [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_ping_pong_order():
    assert list(ping_pong(2, 2)) == [("pre", 0, 0), ("pre", 0, 1), ("post", 0, 0), ("pre", 1, 0), ("post", 0, 1),
                                     ("pre", 1, 1), ("post", 1, 0), ("post", 1, 1)]
    assert list(ping_pong(1, 1)) == [("pre", 0, 0), ("post", 0, 0)]


def test_split_even_cuts_near_equal_tokens_at_sequence_boundaries():
    assert split_even([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert split_even([10, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert split_even([1, 30, 1], 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_even([1, 2, 3, 4, 5, 6], 4) == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert split_even([1] * 16, 3) == [(0, 5), (5, 11), (11, 16)]
    with pytest.raises(ValueError):
        split_even([1, 1], 3)


def test_micro_batch_count_and_limit():
    assert [micro_batch_count(t, s, 2, 8) for t, s in [(7, 4), (8, 2), (64, 1), (64, 16)]] == [1, 2, 1, 2]
    assert [default_micro_batches(d) for d in ("cpu", "cuda", "cuda:1")] == [1, 2, 2]
    assert [micro_batch_count(t, s, 3, 8) for t, s in [(8, 4), (12, 4), (12, 2)]] == [2, 3, 2]
    assert Limits().micro_batches is None and Limits(micro_batches=3).micro_batches == 3  # None: by device
    for bad in (0, 9):
        with pytest.raises(ValueError, match="micro_batches"):
            Limits(micro_batches=bad)
