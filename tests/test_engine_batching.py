"""Continuous batching against each request run alone: requests join at random steps, prompts are prefilled in
chunks of a tiny step budget beside other requests' decodes, some are aborted mid-prefill or mid-decode and their
slots taken by later ones. Every request that was not aborted gets exactly the tokens, logprobs, text and finish
reason of `LLM.generate` running it alone (greedy and seeded sampling, stop strings, penalties), its streamed
deltas join to that text, and every KV-cache slot is free again at the end. GQA (Mixtral) and MLA (DeepSeek-V3)."""

from __future__ import annotations

import random

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.model.dispatch import LocalDispatcher

N = 10


def _requests(llm: LLM, rng: random.Random) -> tuple[list[list[int]], list[SamplingParams]]:
    vocab = llm.engine.spec.vocab_size
    prompts = [llm.encode("Hello wörld 😀 中文"), llm.encode("Once upon a time, in a land far away")]
    prompts += [[rng.randrange(vocab) for _ in range(rng.randint(1, 24))] for _ in range(N - len(prompts))]
    params = []
    for i in range(N):
        kw = dict(max_tokens=rng.randint(1, 12), temperature=(0.0, 0.7, 1.3)[i % 3], seed=i, ignore_eos=True,
                  logprobs=(None, 2)[i % 2], top_p=(1.0, 0.9)[i % 4 == 1], top_k=(0, 3)[i % 5 == 2],
                  repetition_penalty=(1.0, 1.3)[i % 3 == 1], presence_penalty=(0.0, 0.5)[i % 4 == 3])
        text = llm.generate([prompts[i]], SamplingParams(**kw))[0].text
        if i % 2 == 0 and len(text) > 2:  # a stop string somewhere in its solo text, across tokens or not
            at = rng.randrange(len(text) - 1)
            kw["stop"] = (text[at:at + rng.randint(1, 3)],)
        params.append(SamplingParams(**kw))
    return prompts, params


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_requests_joining_and_leaving_mid_run_get_their_solo_outputs(family, tiny_models):
    rng = random.Random(family)
    solo = LLM(str(tiny_models[family]))
    prompts, params = _requests(solo, rng)
    alone = [solo.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    for budget, slots in ((5, 3), (2, 4)):
        engine = LLM(str(tiny_models[family]), max_num_batched_tokens=budget, max_num_seqs=slots).engine
        todo, seqs, streamed, aborted = list(range(N)), {}, {i: "" for i in range(N)}, set()
        while todo or engine.has_work():
            for _ in range(rng.randint(0, 2)):
                if todo:
                    i = todo.pop(0)
                    seqs[i] = engine.add_request(f"r{i}", prompts[i], params[i])
            if rng.random() < 0.15:
                live = [i for i, s in seqs.items() if not s.finished]
                if live:
                    i = rng.choice(live)
                    engine.abort(f"r{i}")
                    aborted.add(i)
            for s in engine.step():
                streamed[int(s.request_id[1:])] += engine.text_delta(s)
        assert engine.scheduler.num_free_slots == slots and not engine.seqs, (budget, slots)
        assert len(aborted) < N - 3, "most requests ran to their end"
        for i, s in seqs.items():
            if i in aborted:
                assert s.finish_reason == "abort"
                continue
            a = alone[i]
            got = (s.output_ids, s.text, streamed[i], s.finish_reason, s.error)
            assert got == (a.token_ids, a.text, a.text, a.finish_reason, None), (budget, slots, i, params[i])
            if a.logprobs is not None:
                assert [(x.token_id, [t for t, _ in x.top]) for x in s.logprobs] == \
                    [(x.token_id, [t for t, _ in x.top]) for x in a.logprobs]
                assert max(abs(x.logprob - y.logprob) for x, y in zip(s.logprobs, a.logprobs)) < 1e-4


class Widths(LocalDispatcher):
    """In-process experts; `widths`: the tokens of each dispatch (every layer of every step)."""

    def __init__(self, store):
        super().__init__(store)
        self.widths: list[int] = []

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        self.widths.append(hidden.shape[0])
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


@pytest.mark.parametrize("budget", [3, None])
def test_decodes_keep_to_the_step_budget_in_turn(budget, tiny_models):
    """8 requests decoding at once when the step budget is lowered to 3 tokens (TokenBudget, as after a prefill
    chunk that fit a shard's memory only in pieces) still ran all 8 decodes every step, so where a shard took 3
    tokens every step failed first. Now a step runs at most 3 decodes, the longest-waiting first: a request due a
    token waits at most 2 steps, none is failed, and each gets its solo tokens and logprobs. With the budget left
    alone (2048), every step still runs every running request's decode."""
    llm = LLM(str(tiny_models["mixtral"]))
    prompts = [llm.encode(p) for p in ("Hi", "Hello there", "A B", "Once", "x y z", "Mixture", "The", "Q")]
    params = [SamplingParams(max_tokens=4 + i, temperature=(0.0, 0.9)[i % 2], seed=i, ignore_eos=True, logprobs=1)
              for i in range(len(prompts))]
    alone = [llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = LLM(str(tiny_models["mixtral"]), max_num_seqs=8).engine
    engine.dispatcher = disp = Widths(engine.dispatcher.store)
    seqs = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    assert len(engine.step()) == 8  # every prefill
    if budget is not None:
        engine.forward.budget.lower(budget)
    disp.widths.clear()
    waited = {s.request_id: 0 for s in seqs}
    while engine.has_work():
        due = {s.request_id for s in engine.scheduler.running}
        ran = {s.request_id for s in engine.step()}
        assert ran <= due and (budget is not None or ran == due), (ran, due)
        for rid in due:
            waited[rid] = 0 if rid in ran else waited[rid] + 1
            assert waited[rid] <= 2, (rid, waited)
    assert max(disp.widths) <= (budget or 8)
    for s, a in zip(seqs, alone):
        assert (s.output_ids, s.finish_reason, s.error) == (a.token_ids, a.finish_reason, None)
        assert max(abs(x.logprob - y.logprob) for x, y in zip(s.logprobs, a.logprobs)) < 1e-4
    assert engine.scheduler.num_free_slots == 8 and not engine.seqs
