"""The runner's `refused` counts client requests refused at capacity, as the gateway's metrics count rejected ones:
an OpenAI request with n choices is one refusal (one HTTP 429), however many of its choices found no place. The
OpenAI app under uvicorn over a real engine, experts in-process and slowed so that the requests holding places last."""

from __future__ import annotations

import time

import openai
import pytest
from openai import OpenAI

from elasticmoe.gateway.openai_api import build_openai_app
from tests.openai_util import MODEL, PROMPT, Core, Server, model  # noqa: F401 - the module-scoped tiny model fixture


def test_an_n_choice_request_refused_at_capacity_counts_once(model):  # noqa: F811
    """Two places (2 slots, no queue). One held: an n=3 request gets one place and two refusals; both held: all
    three are refused. Each is one 429 and one rejected request in the metrics; `refused` counted 2, then 3 more
    (choices), and now counts 1 each."""
    core = Core(*model, max_num_seqs=2, max_queue=0, max_model_len=128)
    core.dispatcher.delay_s = 0.02  # the held requests' 80 tokens outlast the test
    server = Server(build_openai_app(core))
    http = OpenAI(base_url=server.url, api_key="none", max_retries=0)
    held = []
    try:
        for expected in (1, 2):
            held.append(http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
            next(iter(held[-1]))  # its first token came: it holds a place
            with pytest.raises(openai.RateLimitError):
                http.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3)
            assert core.runner.stats()["refused"] == expected
            assert core.metrics.requests.get(("http", "rejected")) == expected
            deadline = time.monotonic() + 10  # the choice admitted is aborted on the engine thread: its place frees
            while core.runner.stats()["admitted"] != len(held):
                assert time.monotonic() < deadline, core.runner.stats()
                time.sleep(0.01)
        assert core.runner.stats()["capacity"] == 2
    finally:
        for stream in held:
            stream.close()
        server.stop()
        core.runner.close()
