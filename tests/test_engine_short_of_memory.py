"""A step that failed for its size (ShortOfMemory: the only copies of some experts on shards out of memory for its
tokens) is not repeated at that size: the engine runs it in halves at once, halving again what fails, and ends
only a request that fails alone; a transient failure (experts unavailable for a moment) keeps its retries. A real
engine over the tiny Mixtral of tests/test_runner.py, experts in-process, the failure raised in the dispatcher seam
as the gateway's dispatcher raises it. Over a real shard out of memory: tests/test_shard_run_memory.py."""

from __future__ import annotations

import pytest

from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.gateway.dispatcher import GrpcDispatcher, RowOverLimit, ShortOfMemory
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from elasticmoe.rpc import frames
from tests.test_runner import GREEDY, PROMPTS, model, reference  # noqa: F401 - fixtures

BACKOFF = (0.0, 0.01, 0.02)


class ShortDispatcher(LocalDispatcher):
    """In-process experts; a dispatch of more than `limit` tokens fails as the gateway's does where the only copies
    are on a shard out of memory for them (ShortOfMemory), or (`transient`) as experts unavailable for a moment,
    or (`row`) as a shard whose message limit is below one token's row (RowOverLimit: here the tokens beyond
    `limit` stand for those routed to that shard). `runs`: the forward runs the engine began (begin_step)."""

    def __init__(self, store, limit: int, transient: bool = False, row: bool = False):
        super().__init__(store)
        self.limit, self.transient, self.row, self.runs = limit, transient, row, 0

    def begin_step(self) -> None:
        self.runs += 1

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        n = hidden.shape[0]
        if n > self.limit and self.transient:
            raise ExpertsUnavailable(f"injected: layer {layer}, {n} tokens")
        if n > self.limit and self.row:
            raise RowOverLimit(f"layer {layer}: shard s0's ELASTICMOE_GRPC_MAX_MESSAGE_BYTES is below one token's row")
        if n > self.limit:
            raise GrpcDispatcher.short_of_memory(layer, {"s0": f"{frames.OUT_OF_MEMORY}: layer {layer}, {n} tokens"})
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


def _run(model, reference, limit, transient=False, long_words: int = 30, row: bool = False):  # noqa: F811
    """The four PROMPTS and a long one in one engine: (outputs or errors, first step's runs, engine)."""
    _, llm = reference
    prompts = [llm.encode(p) for p in PROMPTS] + [llm.encode(" ".join(["experts"] * long_words))]
    disp = ShortDispatcher(model[2], limit(prompts), transient, row)
    engine = Engine(model[1], disp, max_model_len=128, retry_backoff_s=BACKOFF)
    seqs = [engine.add_request(str(i), ids, GREEDY) for i, ids in enumerate(prompts)]
    engine.step()  # every prompt's prefill in one step
    first_runs = disp.runs
    while engine.has_work():
        engine.step()
    return [s.error or s.output_ids for s in seqs], first_runs, engine


@pytest.mark.parametrize("transient", [False, True])
def test_out_of_memory_is_halved_at_once_and_a_transient_failure_retried(model, reference, transient):  # noqa: F811
    """The four short prompts fit together, the long one does not fit with or without them. Out of memory: one run,
    then two halves of about half the tokens each (the long prompt alone), no retry. Unavailable: the retries,
    then each of the five alone. Either way the long request alone ends and the others' tokens are exact."""
    ref, _ = reference
    out, runs, engine = _run(model, reference, lambda prompts: sum(len(p) for p in prompts[:4]), transient)
    assert out[:4] == [ref[p] for p in PROMPTS]
    assert isinstance(out[4], RequestFailed) and engine.failed_requests == 1
    if transient:
        assert (engine.step_retries, runs) == (len(BACKOFF), 1 + len(BACKOFF) + 5)
        assert "experts are unavailable" in str(out[4])
    else:
        assert (engine.step_retries, runs) == (0, 3)
        assert str(out[4]) == ShortOfMemory.public


def test_a_row_over_the_message_limit_is_not_retried(model, reference):  # noqa: F811
    """RowOverLimit (a message limit below one token's row) fails the same way however often the step is repeated:
    no retries (they cost the backoff and fail alike), each sequence is run alone at once; only the request whose
    tokens cannot be carried ends, told the cause, the others' tokens are exact."""
    ref, _ = reference
    out, runs, engine = _run(model, reference, lambda prompts: sum(len(p) for p in prompts[:4]), row=True)
    assert out[:4] == [ref[p] for p in PROMPTS]
    assert isinstance(out[4], RequestFailed) and str(out[4]) == RowOverLimit.public and engine.failed_requests == 1
    assert (engine.step_retries, runs) == (0, 1 + 5)


def test_halves_that_still_do_not_fit_are_halved_again(model, reference):  # noqa: F811
    """No two prompts fit together, each fits alone (the long one too): 5 sequences halved down to one each, all
    served exactly; a run per node of the halving tree (9), no retry."""
    ref, llm = reference
    out, runs, engine = _run(model, reference, lambda prompts: max(len(p) for p in prompts), long_words=3)
    want = llm.generate([" ".join(["experts"] * 3)], GREEDY)[0].token_ids
    assert out == [ref[p] for p in PROMPTS] + [want]
    assert (engine.step_retries, engine.failed_requests, runs) == (0, 0, 9)


def test_a_lone_sequence_short_of_memory_ends_without_another_run(model, reference):  # noqa: F811
    """A step of one sequence that failed for its size: nothing smaller to run (its chunk is the scheduler's), so
    it ends at once; the engine serves the next request."""
    _, llm = reference
    long = llm.encode(" ".join(["experts"] * 30))
    disp = ShortDispatcher(model[2], len(long) - 1)
    engine = Engine(model[1], disp, max_model_len=128, retry_backoff_s=BACKOFF)
    seq = engine.add_request("long", long, GREEDY)
    engine.step()
    assert disp.runs == 1 and str(seq.error) == ShortOfMemory.public and not engine.has_work()
    ok = engine.add_request("short", llm.encode(PROMPTS[0]), GREEDY)
    while engine.has_work():
        engine.step()
    assert ok.error is None and len(ok.output_ids) == GREEDY.max_tokens and engine.step_retries == 0
