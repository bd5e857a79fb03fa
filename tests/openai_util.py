"""Scaffolding of the OpenAI API tests: a real engine over in-process experts (slowed or failed at will), uvicorn on
an ephemeral port, the tiny model and the served fixtures."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn
from openai import OpenAI

from elasticmoe import LLM, SamplingParams
from elasticmoe.config import AppArgs
from elasticmoe.engine.engine import Engine
from elasticmoe.metrics import GatewayMetrics
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import ExpertsUnavailable, LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from tests.store_util import tiny_mixtral

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
MODEL = "mixtral"  # the name `served` answers to: its checkpoint directory's (/v1/models)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about experts."}]


class SlowDispatcher(LocalDispatcher):
    """In-process experts, optionally slowed down so that a request outlives a client's patience, or failing
    (every copy of the experts gone: fault injection into our own dispatcher seam)."""

    delay_s = 0.0
    unavailable = False

    def dispatch(self, layer, hidden, topk_ids, topk_weights):
        time.sleep(self.delay_s)
        if self.unavailable:
            raise ExpertsUnavailable(f"injected: no live copy for layer {layer}")
        return super().dispatch(layer, hidden, topk_ids, topk_weights)


class Core:
    """What the API needs of a GatewayCore: tokenizer, runner, args, wait_ready (and metrics)."""

    def __init__(self, path: str, store: ExpertStore, served_model_name: str | None = None, **limits: int):
        files = open_model(path)
        self.dispatcher = SlowDispatcher(store)
        engine = Engine(files, self.dispatcher, **limits)
        self.tokenizer, self.runner = engine.tokenizer, EngineRunner(engine)
        self.args = AppArgs(model=path, served_model_name=served_model_name)
        spec = files.spec
        self.metrics = GatewayMetrics("per_expert", len(spec.moe.sparse_layers), spec.moe.num_experts,
                                      spec.moe.moe_layers, use_ray=False)
        self.ready = True

    async def wait_ready(self) -> None:
        if not self.ready:
            raise TimeoutError("expert shards are not ready")


class Server:
    """uvicorn on 127.0.0.1 (ephemeral port) in a daemon thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, store = tiny_mixtral(tmp_path_factory.mktemp("oa"))
    return path, store


@pytest.fixture(scope="module")
def llm(model):
    return LLM(model[0])


@pytest.fixture(scope="module")
def served(model):
    """(core, client) with room for 4 sequences of 128 tokens."""
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0)
    server.stop()
    core.runner.close()


def _greedy(llm: LLM, ids: list[int], n: int, **kw):
    return llm.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, **kw))[0]


def _wait_idle(core: Core, timeout: float = 5.0) -> None:
    """Until nothing runs, waits or holds a place (the runner frees a place just after the engine drops its
    sequence, on the engine thread: reading both at once could see the one without the other)."""
    deadline = time.monotonic() + timeout
    while any(core.runner.stats()[k] for k in ("running", "waiting", "admitted")):
        assert time.monotonic() < deadline, "the engine kept running an abandoned request"
        time.sleep(0.02)


def post_json(url: str, body: dict) -> tuple[int, dict]:
    """POST `body` as JSON to `url`: (status, the answer's JSON), an HTTP error's too."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
