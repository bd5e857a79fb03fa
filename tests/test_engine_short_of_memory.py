"""A step that failed for its size (ShortOfMemory: the only copies of some experts on shards out of memory for its
tokens) is not repeated at that size: the engine runs it in halves at once, halving again what fails; a prefill
chunk that fails alone is cut into a smaller piece (down to MIN_PIECE_TOKENS), the rest left to the next steps,
whose budget is held at the piece that fit; only a chunk that fails at the floor ends its request. A transient
failure (experts unavailable for a moment) keeps its retries; RowOverLimit is not retried. A real
engine over the tiny Mixtral of tests/test_runner.py, experts in-process, the failure raised in the dispatcher seam
as the gateway's dispatcher raises it. Over a real shard out of memory: tests/test_shard_run_memory.py."""

from __future__ import annotations

import pytest

from elasticmoe.engine.engine import Engine
from elasticmoe.engine.scheduler import RequestFailed
from elasticmoe.engine.step_forward import BUDGET_HOLD_S, MIN_PIECE_TOKENS
from elasticmoe.gateway.dispatcher import GrpcDispatcher, RowOverLimit, ShortOfMemory
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from elasticmoe.rpc import frames
from tests.test_runner import GREEDY, PROMPTS, model, reference  # noqa: F401 - fixtures

BACKOFF = (0.0, 0.01, 0.02)


class ShortDispatcher(LocalDispatcher):
    """In-process experts; a dispatch of more than `limit` tokens fails as the gateway's does where the only copies
    are on a shard out of memory for them (ShortOfMemory), or (`transient`) as experts unavailable for a moment,
    or (`row`) as a shard whose message limit is below one token's row (RowOverLimit: here the tokens beyond
    `limit` stand for those routed to that shard). `runs`: the forward runs the engine began (begin_step);
    `refused`: the dispatches that failed (each ends its run)."""

    def __init__(self, store, limit: int, transient: bool = False, row: bool = False):
        super().__init__(store)
        self.limit, self.transient, self.row, self.runs, self.refused = limit, transient, row, 0, 0

    def begin_step(self) -> None:
        self.runs += 1

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        n = hidden.shape[0]
        self.refused += n > self.limit
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
    """The four short prompts fit together (34 tokens), the long one (62) does not fit with or without them. Out of
    memory: one run, then two halves of about half the tokens each (the long prompt alone), its chunk then cut to
    a first piece of 31 tokens, no retry; every request is served, exactly. Unavailable: the retries, then each of
    the five alone, and the long request alone ends. Either way the others' tokens are exact."""
    ref, llm = reference
    out, runs, engine = _run(model, reference, lambda prompts: sum(len(p) for p in prompts[:4]), transient)
    assert out[:4] == [ref[p] for p in PROMPTS]
    if transient:
        assert isinstance(out[4], RequestFailed) and engine.failed_requests == 1
        assert (engine.step_retries, runs) == (len(BACKOFF), 1 + len(BACKOFF) + 5)
        assert "experts are unavailable" in str(out[4])
    else:
        assert out[4] == llm.generate([" ".join(["experts"] * 30)], GREEDY)[0].token_ids
        assert (engine.step_retries, engine.failed_requests, runs) == (0, 0, 4)


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


LONG = " ".join(["experts"] * 50)  # 102 tokens


def _lone(model, llm, limit: int, hold_s: float | None = None):  # noqa: F811
    """An engine whose dispatches of more than `limit` tokens are out of memory, LONG's prefill run alone in it:
    (the sequence, the runs of its first step, the dispatcher, the engine). No prefix caching: LONG again runs
    its whole prefill."""
    disp = ShortDispatcher(model[2], limit)
    engine = Engine(model[1], disp, max_model_len=128, retry_backoff_s=BACKOFF, prefix_caching=False)
    if hold_s is not None:
        engine.forward.budget.hold_s = hold_s
    seq = engine.add_request("long", llm.encode(LONG), GREEDY)
    engine.step()
    return seq, disp.runs, disp, engine


@pytest.mark.parametrize("hold_s", [BUDGET_HOLD_S, 0.0])
def test_a_lone_prefill_chunk_out_of_memory_runs_in_pieces_and_the_budget_holds(model, reference, hold_s):  # noqa: F811
    """LONG's 102-token chunk fails alone (30 tokens fit): its first piece is halved to 51 (fails), then 26, which
    runs; the other 76 tokens run in the next steps, in chunks of at most 26 (the budget held there), none failing;
    the tokens are those of LLM.generate. A second long request, while the budget holds, runs no step that fails;
    with no hold (0 s) the budget is back at once, and each of its prefill steps hits the wall again (5 failed
    runs)."""
    _, llm = reference
    seq, runs, disp, engine = _lone(model, llm, 30, hold_s)
    assert runs == 3 and disp.refused == 2 and seq.num_cached == 26 and seq.error is None
    while engine.has_work():
        engine.step()
    want = llm.generate([LONG], GREEDY)[0].token_ids
    assert seq.output_ids == want and (engine.failed_requests, engine.step_retries) == (0, 0)
    assert engine.forward.budget.tokens() == (26 if hold_s else 2048)
    refused = disp.refused
    again = engine.add_request("again", llm.encode(LONG), GREEDY)
    while engine.has_work():
        engine.step()
    assert again.output_ids == want and engine.failed_requests == 0
    # no hold: 102 and 51 fail (26 runs), then 76 and 38 (19 runs), then 57 (29 runs, 28 left fit)
    assert disp.refused - refused == (0 if hold_s else 5), disp.refused - refused


def test_a_chunk_out_of_memory_even_at_the_floor_ends_and_others_are_served(model, reference):  # noqa: F811
    """10 tokens fit, fewer than MIN_PIECE_TOKENS: LONG's chunk is cut to 51, 26, then 16 tokens, each failing,
    and the request ends with the out-of-memory text, after 4 runs; the budget is left as it was (no piece fit),
    and the next request, small enough, is served exactly."""
    ref, llm = reference
    seq, runs, _, engine = _lone(model, llm, 10)
    assert MIN_PIECE_TOKENS == 16 and runs == 4 and str(seq.error) == ShortOfMemory.public and not engine.has_work()
    assert engine.forward.budget.tokens() == 2048
    ok = engine.add_request("short", llm.encode(PROMPTS[0]), GREEDY)
    while engine.has_work():
        engine.step()
    assert ok.output_ids == ref[PROMPTS[0]] and engine.step_retries == 0 and engine.failed_requests == 1


def test_decodes_beyond_a_lowered_budget_wait_their_turn(model, reference):  # noqa: F811
    """32 requests decoding when a shard's memory shrinks to 30 tokens: LONG's prefill chunk fits only in pieces
    and the budget is held at the piece that fit (26). The scheduler still ran all 32 decodes each step, so every
    step failed for its size once and was halved; now a step runs at most 26 decodes (the others keep their slots
    and go first next step): no run is refused after the budget is lowered, and every request gets its tokens."""
    ref, llm = reference
    disp = ShortDispatcher(model[2], 1 << 20)
    engine = Engine(model[1], disp, max_model_len=128, max_num_seqs=40, retry_backoff_s=BACKOFF)
    seqs = [engine.add_request(str(i), llm.encode(PROMPTS[i % 4]), GREEDY) for i in range(32)]
    engine.step()  # every prefill
    disp.limit = 30
    long = engine.add_request("long", llm.encode(LONG), GREEDY)
    engine.step()  # 32 decodes and LONG's chunk, halved; the chunk cut to 26 tokens, the budget held there
    assert engine.forward.budget.tokens() == 26 and long.num_cached == 26 and engine.failed_requests == 0
    refused = disp.refused
    while engine.has_work():
        engine.step()
    assert disp.refused == refused and engine.failed_requests == 0
    assert [s.output_ids for s in seqs] == [ref[PROMPTS[i % 4]] for i in range(32)]
    assert long.output_ids == llm.generate([LONG], GREEDY)[0].token_ids


def test_a_decode_only_step_out_of_memory_lowers_the_budget(model, reference):  # noqa: F811
    """32 requests decoding, no prefill, when a shard's memory shrinks to 20 tokens: the step is halved (two runs of
    16 fit) and the budget held at 16, so the next steps run 16 decodes each (the others keep their slots) and none
    fails; the budget used to be lowered only by a prefill chunk's piece, so every decode step failed once and was
    halved again. Every request gets LLM.generate's tokens."""
    ref, _ = reference
    disp = ShortDispatcher(model[2], 1 << 20)
    engine = Engine(model[1], disp, max_model_len=128, max_num_seqs=40, retry_backoff_s=BACKOFF)
    seqs = [engine.add_request(str(i), llm_ids, GREEDY) for i, llm_ids in enumerate(_prompt_ids(reference, 32))]
    engine.step()  # every prefill
    disp.limit = 20
    engine.step()  # 32 decodes: refused, then two halves of 16
    assert engine.forward.budget.tokens() == 16 and disp.refused == 1 and engine.failed_requests == 0
    while engine.has_work():
        engine.step()
    assert disp.refused == 1 and engine.failed_requests == 0 and engine.step_retries == 0
    assert [s.output_ids for s in seqs] == [ref[PROMPTS[i % 4]] for i in range(32)]


def _prompt_ids(reference, n: int) -> list[list[int]]:
    _, llm = reference
    return [llm.encode(PROMPTS[i % 4]) for i in range(n)]


class BlipDispatcher(ShortDispatcher):
    """ShortDispatcher whose first run that fails (out of memory, or `crash`: a bug) arms `blips` dispatches
    after it that would succeed to fail instead as experts unavailable for a moment (ExpertsUnavailable)."""

    def __init__(self, store, limit: int, blips: int, crash: bool = False):
        super().__init__(store, limit)
        self.blips, self.crash, self.armed = blips, crash, False

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        if self.crash:
            self.crash, self.armed = False, True
            raise RuntimeError("injected: a bug in this step")
        if hidden.shape[0] > self.limit:
            self.armed = True
        elif self.armed and self.blips:
            self.blips -= 1
            raise ExpertsUnavailable(f"injected: layer {layer} unavailable for a moment")
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


@pytest.mark.parametrize("case", ["halves", "piece", "one by one"])
def test_a_transient_failure_while_halving_or_one_by_one_is_retried(model, reference, case):  # noqa: F811
    """Experts unavailable for a moment while a step ran in halves (no two prompts fit), as a prefill chunk's
    piece (LONG, 30 tokens fit) or one sequence at a time (after a bug in the step) ended the request of that run
    with no retry, though the same failure in a whole step is retried. Now it is retried (one retry), and every
    request gets its tokens."""
    ref, llm = reference
    texts = PROMPTS + [" ".join(["experts"] * 3)] if case != "piece" else [LONG]
    prompts = [llm.encode(t) for t in texts]
    limit = {"halves": max(map(len, prompts)), "piece": 30, "one by one": 1 << 20}[case]
    disp = BlipDispatcher(model[2], limit, blips=1, crash=case == "one by one")
    engine = Engine(model[1], disp, max_model_len=128, retry_backoff_s=BACKOFF)
    seqs = [engine.add_request(str(i), ids, GREEDY) for i, ids in enumerate(prompts)]
    while engine.has_work():
        engine.step()
    assert disp.blips == 0 and (engine.step_retries, engine.failed_requests) == (1, 0)
    want = [ref[t] if t in ref else llm.generate([t], GREEDY)[0].token_ids for t in texts]
    assert [s.output_ids for s in seqs] == want


def test_the_retries_of_a_step_in_halves_are_the_step_s_not_each_run_s(model, reference):  # noqa: F811
    """Experts unavailable for good while a step runs in halves: its runs share the retries of one step
    (retry_backoff_s), not as many again for each half or sequence; then the requests end, told why."""
    _, llm = reference
    prompts = [llm.encode(t) for t in PROMPTS]
    disp = BlipDispatcher(model[2], max(map(len, prompts)), blips=1000)
    engine = Engine(model[1], disp, max_model_len=128, retry_backoff_s=BACKOFF)
    seqs = [engine.add_request(str(i), ids, GREEDY) for i, ids in enumerate(prompts)]
    engine.step()
    assert (engine.step_retries, engine.failed_requests, engine.has_work()) == (len(BACKOFF), 4, False)
    assert all("experts are unavailable" in str(s.error) for s in seqs)
