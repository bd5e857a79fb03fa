"""End to end, the demo model served as `make run` serves it (real `ray start`, `serve deploy`): gRPC, HTTP and the
offline LLM.generate give identical tokens and the learned continuation; `elasticmoe status --json` parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import GenerationClient
from elasticmoe.model.demo import DEMO_PROMPTS
from elasticmoe.model.embedded import ensure_tiny_model
from tests.serving_util import GRPC, app_entry, deploy

pytestmark = pytest.mark.e2e
APP = "demo"
HTTP = f"http://127.0.0.1:8000/{APP}/v1"
N = 24


@pytest.fixture(scope="module")
def demo_app(ray_cluster, tmp_path_factory):
    ensure_tiny_model("demo")  # trained here once, so the replicas find it in the cache
    deploy(ray_cluster, [app_entry(APP, "tiny:demo", 2)], tmp_path_factory.mktemp("demo") / "demo.yaml")
    return APP


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    llm = LLM("tiny:demo")
    outs = llm.generate(list(DEMO_PROMPTS), SamplingParams(max_tokens=N, temperature=0))
    return {p: o.token_ids for p, o in zip(DEMO_PROMPTS, outs)}


def _http_ids(prompt: str) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=HTTP, api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny:demo", prompt=prompt, max_tokens=N, temperature=0, logprobs=0,
                                  extra_body={"return_tokens_as_token_ids": True})
    return [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]


@pytest.mark.parametrize("prompt", DEMO_PROMPTS)
def test_grpc_http_and_llm_give_identical_tokens(demo_app, reference, prompt):
    client = GenerationClient(GRPC, app=demo_app, timeout_s=120)
    unary = list(client.generate(prompt, max_tokens=N, temperature=0.0).token_ids)
    streamed = [t for c in client.stream(prompt, max_tokens=N, temperature=0.0) for t in c.token_ids]
    assert unary == streamed == _http_ids(prompt) == reference[prompt]


def test_the_served_demo_continues_the_fox(demo_app):
    r = GenerationClient(GRPC, app=demo_app, timeout_s=120).generate("The quick brown fox", max_tokens=N,
                                                                      temperature=0.0)
    assert r.text.startswith(" jumps over the lazy dog"), r.text


def test_status_json_shows_the_demo_routing(demo_app):
    for prompt in DEMO_PROMPTS:  # some traffic for the shards to count
        GenerationClient(GRPC, app=demo_app, timeout_s=120).generate(prompt, max_tokens=N, temperature=0.0)
    # as from a plain shell, as `make run` tells its user to: none of the Makefile's RAY_ settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-m", "elasticmoe.cli", "status", "--json", "--app", demo_app],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "INFO" not in out.stderr, out.stderr[-2000:]  # Serve's router start-up line once interleaved the output
    st = json.loads(out.stdout)
    assert st["complete"] and len(st["shards"]) == 2 and all(s["healthy"] and s["ready"] for s in st["shards"])
    counts = [n for s in st["shards"] for _, _, n in s["expert_tokens"]]
    assert sum(counts) > 0 and max(counts) > min(counts)  # learned routing: experts are not equally busy
