"""Qwen3-Next (Gated DeltaNet state per slot), LFM2-MoE (short-conv windows), GraniteMoeHybrid (Mamba2 windows and
scan states), MiniMax (lightning attention state per slot), Kimi-Linear (KDA state per slot), Jamba (Mamba v1
windows and scan states) and DeepSeek-V3.2 (sparse-attention index keys) served as the gateway serves them: the dense
half in an Engine, the experts on two in-process gRPC shards; a shard dying mid-step with a replica elsewhere, with
none until the controller re-homes its experts, and with none at all."""

from __future__ import annotations

import random
import threading
import time

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.gateway.dispatcher import GrpcDispatcher
from tests.shard_util import ALL_BOTH, E, SPLIT, Shards
from tests.test_families import make_family_checkpoint
from tests.test_families_more import MORE_CASES

TOKENS = 10
GREEDY = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
LENGTHS = [70, 3, 40, 12]  # past the delta rule's 64-token block; past index_topk (8): the indexer picks
# the step whose last MoE layer finds shard 0 gone (KillingDispatcher.due): some tokens out while a running prompt is
# still being prefilled, or every request decoding
KILL_STEP, DECODING = "prefilling", "decoding"


@pytest.fixture(scope="module", params=["qwen3_next", "lfm2_moe", "granitemoehybrid", "minimax", "kimi_linear", "jamba",
                                                "deepseek_v32"])
def family(request, tmp_path_factory):
    """(LLM, prompts, each prompt's greedy tokens from LLM.generate run on it alone)."""
    model_type = request.param
    path = make_family_checkpoint(model_type, tmp_path_factory.mktemp(model_type) / "m", case=MORE_CASES[model_type])
    llm = LLM(str(path), dtype="float32")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in LENGTHS + [25, 9]]
    return llm, prompts, [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


class KillingDispatcher(GrpcDispatcher):
    """The gateway's dispatcher; at the first step that is `step` ("prefilling" | "decoding" | None: never, see due)
    it stops shard `victim` (a real server stop: its connections break) just before sending that step's first call for
    `layer`: the layers before it ran on both shards, their attention, linear-attention state and index keys already
    written for the step. (A step number chose it before, but a step retried on a loaded host, a call slower than its
    deadline, counts twice: the kill then came before any token was out.)"""

    def __init__(self, shards: Shards, victim: int, step: str | None, layer: int, **kw):
        super().__init__(timeout_s=5, **kw)
        self.shards, self.victim, self.at_step, self.at_layer = shards, victim, step, layer
        self.killed = threading.Event()
        self.seqs: list = []  # the test's requests (set by _steps)
        self.before: list[int] = []  # each request's tokens when the shard died

    def due(self) -> bool:
        """Whether this step is the kill's, from the requests' progress at its start."""
        out = [len(s.output_ids) for s in self.seqs]
        if self.at_step == KILL_STEP:
            return sum(out) > 0 and any(s.slot >= 0 and s.num_cached < len(s.prompt_ids) for s in self.seqs)
        return self.at_step == DECODING and bool(out) and min(out) > 0 and any(n < TOKENS for n in out)

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if layer == self.at_layer and not self.killed.is_set() and self.due():
            self.before = [len(s.output_ids) for s in self.seqs]
            self.shards.servers[self.victim].stop(None).wait(5)
            self.killed.set()
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


def _served(llm: LLM, shards: Shards, copies: dict[int, list[int]], **kw) -> tuple[Engine, KillingDispatcher]:
    d = KillingDispatcher(shards, **kw)
    d.set_table(shards.table(copies))
    engine = Engine(llm.files, d, max_num_seqs=4, max_num_batched_tokens=24, tokenizer=llm.tokenizer,
                    pipeline_min_tokens=2, retry_backoff_s=(0.0, 0.0))
    return engine, d


def _steps(engine: Engine, d: KillingDispatcher, seqs: list, until=None) -> None:
    """Step the engine until it has no work (or `until()`); the dispatcher notes each request's tokens as it stops
    the shard. (This loop noted them when d.steps + 1 == d.at_step, but a step retried before the kill, a call
    slower than its deadline on a loaded host, begins twice: the count skipped it and nothing was noted.)"""
    d.seqs = seqs
    while engine.has_work() and not (until and until()):
        engine.step()


@pytest.fixture
def shards(family):
    shards = Shards(family[0].files, [list(range(E)), list(range(E))])
    yield shards
    shards.close()


def _add(engine: Engine, prompts: list[list[int]], first: int = 0) -> list:
    return [engine.add_request(f"r{first + i}", p, GREEDY) for i, p in enumerate(prompts)]


def test_served_through_two_shards_equals_single_process(family, shards):
    """Four concurrent requests, experts split over two shards (chunked prefills beside decodes, pipelined
    micro-batches): each gets LLM.generate's tokens for its prompt alone; both shards served tokens."""
    llm, prompts, want = family
    engine, d = _served(llm, shards, SPLIT, victim=0, step=None, layer=-1)
    seqs = _add(engine, prompts[:4])
    _steps(engine, d, seqs)
    assert [s.error or s.output_ids for s in seqs] == want[:4]
    assert set(d.shard_tokens) == {"s0", "s1"} and d.failovers == 0 and engine.step_retries == 0
    d.close()


def test_a_shard_dying_mid_step_fails_over_to_its_replica(family, shards):
    """Every expert on both shards; shard 0 stops mid-step (its last MoE layer, after the linear-attention state
    and index keys of the layers before were written), some tokens out: every request still gets exactly the
    single-process tokens, the dead shard's calls re-sent to shard 1 inside the step."""
    llm, prompts, want = family
    reported: list[str] = []
    engine, d = _served(llm, shards, ALL_BOTH, victim=0, step=KILL_STEP, layer=shards.layers[-1],
                        on_failure=reported.append)
    seqs = _add(engine, prompts[:4])
    _steps(engine, d, seqs)
    assert d.killed.is_set() and 0 < sum(d.before) and any(n < TOKENS for n in d.before), d.before
    assert [s.error or s.output_ids for s in seqs] == want[:4]
    assert d.failovers >= 1 and engine.failed_requests == 0
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(reported) == {"s0"}  # (twice where both micro-batches' calls were on their way to it)
    d.close()


@pytest.mark.parametrize("step", [KILL_STEP, DECODING])
def test_a_step_retried_after_the_controller_re_homes_reads_the_state_it_started_from(family, shards, step):
    """Experts split, no replica: shard 0 dies mid-step; the step fails (no copy, failover_s) and the engine repeats
    it once the controller has loaded shard 0's experts on shard 1 (held until the first retry has begun). The
    repeated step reads the linear-attention state and index keys as they were at its start: exact tokens."""
    llm, prompts, want = family
    engine = None

    def controller(shard_id: str):
        deadline = time.monotonic() + 10
        while engine.step_retries < 1 and time.monotonic() < deadline:  # the step's first attempt has failed
            time.sleep(0.01)
        shards.stores[1].load([(layer, e) for layer in shards.layers for e in range(E)])
        return shards.table({e: [1] for e in range(E)}, version=2, alive=[1])

    engine, d = _served(llm, shards, SPLIT, victim=0, step=step, layer=shards.layers[-1], failover_s=0.2,
                        on_failure=controller)
    engine.retry_backoff_s = (0.05,) * 8
    seqs = _add(engine, prompts[:4])
    _steps(engine, d, seqs)
    assert d.killed.is_set() and 0 < sum(d.before) and any(n < TOKENS for n in d.before), d.before
    assert [s.error or s.output_ids for s in seqs] == want[:4]
    assert engine.step_retries >= 1 and engine.failed_requests == 0
    assert step == KILL_STEP or min(d.before) > 0, d.before  # every request was decoding
    d.close()


def test_no_copy_left_ends_only_that_steps_requests_and_their_slots_start_clean(family, shards):
    """Experts split, no replica, no controller: shard 0 dies mid-step; after the retries and a run of each
    sequence alone, the requests of that step that need shard 0 end (RequestFailed, experts unavailable) and
    nothing else does: one whose tokens the router sends to shard 1 alone from then on goes on (lfm2_moe's r0 here),
    and a fifth request, waiting for a slot, is served. Once the experts are back (on shard 1), it and a new request
    take the freed slots (their per-slot state and index keys zeroed as their requests ended) and every request not
    failed gets exactly its single-process tokens."""
    llm, prompts, want = family
    engine, d = _served(llm, shards, SPLIT, victim=0, step=KILL_STEP, layer=shards.layers[-1], failover_s=0.1)
    first = _add(engine, prompts[:5])  # 4 slots: the fifth waits
    _steps(engine, d, first, until=lambda: any(s.error for s in first))
    assert d.killed.is_set() and 0 < sum(d.before) and any(n < TOKENS for n in d.before), d.before
    failed = [s for s in first if s.error is not None]
    assert failed and all(isinstance(s.error, RequestFailed) and "experts are unavailable" in str(s.error)
                          for s in failed)
    assert {s.request_id for s in failed} <= {"r0", "r1", "r2", "r3"}  # the step's, each failing alone too
    assert first[4].error is None and engine.failed_requests == len(failed)
    shards.stores[1].load([(layer, e) for layer in shards.layers for e in range(E)])
    d.set_table(shards.table({e: [1] for e in range(E)}, version=2, alive=[1]))
    later = [first[4]] + _add(engine, prompts[5:], first=5)
    _steps(engine, d, first + later)
    assert [s.error or s.output_ids for s in later] == want[4:]
    kept = [i for i, s in enumerate(first[:4]) if s not in failed]
    assert [first[i].output_ids for i in kept] == [want[i] for i in kept]
    assert engine.failed_requests == len(failed)
    d.close()
