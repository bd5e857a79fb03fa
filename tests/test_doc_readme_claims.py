"""The README's statements about the demo, the fan-out and the fault handling that name a number or a printed line:
each is checked against the code that makes it so (tests/test_doc_claims.py: names, commands and defaults)."""

from __future__ import annotations

import re

from tests.doc_util import REPO

README = " ".join((REPO / "README.md").read_text().split())


def _demo_block() -> list[str]:
    return re.search(r"```\n(\[1/4\].*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1).splitlines()


def test_the_demo_model_is_the_one_described():
    """"a 2-layer, 8-expert, top-2 Mixtral (1.9 MB) that it trains on first use (300 Adam steps ...)", cached as
    demo-mixtral-<recipe hash> (the name the demo's output shows)."""
    import torch
    from transformers import MixtralForCausalLM

    from elasticmoe.model.demo import DemoArgs, demo_config, make_tokenizer
    from elasticmoe.model.embedded import demo_model_dir

    assert "a 2-layer, 8-expert, top-2 Mixtral (1.9 MB) that it trains on first use (300 Adam steps" in README
    a = DemoArgs()
    assert (a.layers, a.experts, a.top_k, a.steps) == (2, 8, 2, 300)
    with torch.device("meta"):
        model = MixtralForCausalLM(demo_config(a, make_tokenizer(a.vocab)))
    assert round(sum(p.numel() for p in model.parameters()) * 4 / 1e6, 1) == 1.9  # float32 safetensors
    shown = re.search(r"\.cache/elasticmoe/(demo-mixtral-\w+)", _demo_block()[0]).group(1)
    assert demo_model_dir().name == shown


def test_the_demo_completions_are_the_offline_greedy_ones():
    """"The completions are the in-process `LLM`'s greedy tokens": the README's four, 24 tokens each."""
    from elasticmoe import LLM, SamplingParams
    from elasticmoe.model.demo import DEMO_PROMPTS

    answers = {p: (t, n) for p, t, n in re.findall(r"^  ('.*?') -> ('.*?')  \((\d+) tokens", "\n".join(_demo_block()),
                                                   flags=re.M)}
    assert len(answers) == 4
    outs = LLM("tiny:demo").generate(list(DEMO_PROMPTS), SamplingParams(max_tokens=24, temperature=0.0))
    assert {repr(p): (repr(o.text), str(len(o.token_ids))) for p, o in zip(DEMO_PROMPTS, outs)} == answers


def test_fan_out_and_fault_numbers():
    """"else to that shard again 50 ms later"; a frame listener open at exit lets its frame finish "(up to 5 s)";
    micro-batches need "at least 8 tokens from two or more sequences in a step"."""
    import inspect

    from elasticmoe.engine.engine import Engine
    from elasticmoe.gateway.failover import BUSY_RETRY_S
    from elasticmoe.model.pipeline import micro_batch_count
    from elasticmoe.rpc.frame_listener import EXIT_WAIT_S

    assert "else to that shard again 50 ms later" in README and BUSY_RETRY_S == 0.05
    assert "lets that frame finish (up to 5 s)" in README and EXIT_WAIT_S == 5.0
    assert "at least 8 tokens from two or more sequences in a step" in README
    least = inspect.signature(Engine).parameters["pipeline_min_tokens"].default
    assert least == 8
    assert [micro_batch_count(t, s, 2, least) for t, s in [(7, 7), (8, 1), (8, 2), (64, 2)]] == [1, 1, 2, 2]


def test_the_controller_reads_the_shards_counters_once_a_second():
    """"The controller reads every live shard's counters once a second": its stats loop's interval."""
    from elasticmoe.autoscaler.controller import STATS_INTERVAL_S

    assert "The controller reads every live shard's counters once a second" in README and STATS_INTERVAL_S == 1.0
