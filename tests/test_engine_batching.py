"""Continuous batching against each request run alone: requests join at random steps, prompts are prefilled in
chunks of a tiny step budget beside other requests' decodes, some are aborted mid-prefill or mid-decode and their
slots taken by later ones. Every request that was not aborted gets exactly the tokens, logprobs, text and finish
reason of `LLM.generate` running it alone (greedy and seeded sampling, stop strings, penalties), its streamed
deltas join to that text, and every KV-cache slot is free again at the end. GQA (Mixtral) and MLA (DeepSeek-V3)."""

from __future__ import annotations

import random

import pytest

from elasticmoe import LLM, SamplingParams

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
