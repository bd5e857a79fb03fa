"""elasticmoe_expert_tokens_total counts each token's routing once, as transformers' router makes it: a step whose
experts failed and was repeated (retried, or run one sequence at a time) is not counted per attempt. A real engine
over the tiny Mixtral of tests/test_runner.py, faults injected in its dispatcher seam, GatewayMetrics wired as
GatewayCore wires it."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from elasticmoe.engine.engine import Engine
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.model.dispatch import LocalDispatcher
from tests.test_runner import GREEDY, PROMPTS, FaultyDispatcher, model, reference  # noqa: F401 - fixtures


def _routed(model, dispatcher) -> tuple[np.ndarray, list[list[int]]]:  # noqa: F811
    """(expert-token totals [layers, experts], each prompt's tokens) of the prompts run together."""
    _, files, _ = model
    spec = files.spec
    metrics = GatewayMetrics("per_expert", spec.num_layers, spec.moe.num_experts, spec.moe.moe_layers, use_ray=False)
    engine = Engine(files, dispatcher, max_model_len=128, retry_backoff_s=(0.0, 0.0))
    engine.model.route_observer = metrics.route
    seqs = [engine.add_request(str(i), engine.tokenizer.encode(p), GREEDY) for i, p in enumerate(PROMPTS)]
    while engine.has_work():
        engine.step()
    return metrics.expert_token_totals(), [list(s.output_ids) for s in seqs]


def test_a_retried_step_counts_its_routing_once(model, reference):  # noqa: F811
    want, want_tokens = _routed(model, LocalDispatcher(model[2]))
    assert want.sum() > 0
    for fails in ({3}, {3, 4}, {3, 4, 5}):  # once, twice (retries), three times (then one sequence at a time)
        got, tokens = _routed(model, FaultyDispatcher(model[2], fail=lambda calls, n, f=fails: calls in f))
        assert tokens == want_tokens, fails
        np.testing.assert_array_equal(got, want, err_msg=f"failed dispatches {sorted(fails)}")


def test_the_counts_are_the_routings_transformers_makes(model):  # noqa: F811
    """Per (layer, expert), the tokens counted equal the top-k choices of transformers' router over every token the
    engine ran: each prompt and its output but the last token (sampled, never run)."""
    path, files, store = model
    got, outputs = _routed(model, LocalDispatcher(store))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer, k = Engine(files, LocalDispatcher(store), max_model_len=128).tokenizer, files.spec.moe.top_k
    want = np.zeros_like(got)
    with torch.no_grad():
        for prompt, out in zip(PROMPTS, outputs):
            ids = tokenizer.encode(prompt) + out[:-1]
            for layer, logits in enumerate(hf(torch.tensor([ids]), output_router_logits=True).router_logits):
                np.add.at(want[layer], logits.reshape(len(ids), -1).topk(k, -1).indices.flatten().numpy(), 1)
    ran = sum(len(tokenizer.encode(p)) + len(o) - 1 for p, o in zip(PROMPTS, outputs))
    assert want.sum() == ran * k * len(files.spec.moe.moe_layers)
    np.testing.assert_array_equal(got, want)
