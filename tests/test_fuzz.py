"""Property-based fuzzing of the front door, in process: random and mutated GenerateRequests, raw protobuf bytes
and OpenAI bodies against a real engine (tiny Mixtral, experts in-process), while greedy neighbours run and
must keep getting exactly their reference tokens. Outcomes allowed: served, or a client error naming a field
(INVALID_ARGUMENT / 400 / 413, or 404 for a model not served); never a server error, a failed neighbour or a
leaked slot."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx2 as httpx  # the HTTP client starlette and openai use here
import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import DecodeError
from hypothesis import given

from elasticmoe import LLM, SamplingParams
from elasticmoe.config import AppArgs
from elasticmoe.engine.engine import Engine
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.scheduler import QueueFull
from elasticmoe.gateway.grpc_api import parse_request
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.request_stream import Update
from elasticmoe.gateway.runner import EngineRunner
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import generation_pb2 as gen
from tests.fuzz_util import FUZZ, Neighbours, generate_requests, openai_bodies, raw_request_bytes
from tests.store_util import full_store

PROMPTS = ["The expert said", "Once upon a time", "Mixture of experts"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
GRPC_FIELDS = {"request_id", "prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "ignore_eos", "logprobs"}


class Served:
    """A runner (context 48) with its own asyncio loop thread, the HTTP app over it, and greedy references."""

    def __init__(self, path: str):
        files = open_model(path)
        store = full_store(files)
        engine = Engine(files, LocalDispatcher(store), max_model_len=48, max_num_seqs=8, max_queue=64)
        self.runner, self.tokenizer, self.args = EngineRunner(engine), engine.tokenizer, AppArgs(model=path)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        llm = LLM(path)
        self.reference = {p: llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS}
        self.app = build_openai_app(self)
        self.http = TestClient(self.app)  # the known-bad bodies, through a full HTTP stack
        self.client = self.call(self._client())  # the fuzzer: ASGI calls on the loop, no thread hop per request

    async def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://fuzz", timeout=60)

    def post(self, path: str, body: bytes) -> httpx.Response:
        return self.call(self.client.post(path, content=body, headers={"content-type": "application/json"}))

    async def wait_ready(self) -> None:
        return None

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _first(self, ids: list[int], params: SamplingParams) -> Update:
        stream = self.runner.generate("fuzz", ids, params)
        try:
            return await stream.__anext__()
        finally:
            await stream.aclose()

    async def _greedy(self, prompt: str) -> list[int]:
        out: list[int] = []
        async for u in self.runner.generate("neighbour", self.tokenizer.encode(prompt), GREEDY):
            out += u.token_ids
        return out

    def neighbours(self) -> Neighbours:
        return Neighbours(lambda p: self.call(self._greedy(p)), self.reference)

    def grpc(self, req: gen.GenerateRequest) -> str:
        """What the gateway's _start would answer: "invalid" (naming a field), "full", or "ok" (first token)."""
        try:
            _, ids, params = parse_request(req, self.tokenizer, self.runner.engine.validator)
        except InvalidRequest as e:
            assert e.field.split("[")[0] in GRPC_FIELDS, e
            return "invalid"
        try:
            u = self.call(self._first(ids, params))
        except QueueFull:
            return "full"
        assert isinstance(u, Update) and len(u.token_ids) >= 1
        return "ok"

    def idle(self) -> bool:
        st = self.runner.stats()
        return st["admitted"] == 0 and st["running"] == 0 and st["free_slots"] == 8

    def close(self) -> None:
        self.call(self.client.aclose())
        self.http.close()
        self.runner.close()
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = str(make_tiny_model("mixtral", tmp_path_factory.mktemp("fz") / "mixtral", layers=2, experts=4))
    s = Served(path)
    yield s
    s.close()


def _wait_idle(served: Served) -> None:
    import time

    deadline = time.monotonic() + 10
    while not served.idle():
        assert time.monotonic() < deadline, served.runner.stats()
        time.sleep(0.01)


def _exact(nb: Neighbours) -> None:
    assert nb.mismatches == [] and nb.done >= 2, (nb.mismatches[:3], nb.done)


def test_fuzzed_generate_requests(served):
    seen: dict[str, int] = {}

    @FUZZ
    @given(generate_requests())
    def one(req):
        out = served.grpc(req)
        seen[out] = seen.get(out, 0) + 1

    with served.neighbours() as nb:
        one()
    _exact(nb)
    assert seen.get("invalid", 0) > 0 and seen.get("ok", 0) > 0, seen
    _wait_idle(served)


def test_fuzzed_protobuf_bytes(served):
    seen: dict[str, int] = {}

    @FUZZ
    @given(raw_request_bytes())
    def one(data):
        try:
            req = gen.GenerateRequest.FromString(data)
        except DecodeError:
            out = "undecodable"
        else:
            out = served.grpc(req)
        seen[out] = seen.get(out, 0) + 1

    with served.neighbours() as nb:
        one()
    _exact(nb)
    assert seen.get("undecodable", 0) > 0 and seen.get("invalid", 0) > 0, seen
    _wait_idle(served)


def _check_http(status: int, body: bytes) -> str:
    """Allowed answers: 200 (a whole completion or a whole SSE stream), or an OpenAI error body."""
    assert status in (200, 400, 404, 413, 429), (status, body[:300])
    if status != 200:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["type"]
        if status == 400:  # OpenAI's codes for a bad field
            assert err["code"] in ("invalid_value", "invalid_type", "missing_required_parameter", "unknown_parameter",
                                   "unsupported_value", "context_length_exceeded", "empty_array", "invalid_json"), err
        else:
            assert err["code"] == ("model_not_found" if status == 404 else None), err  # 404: a model not served
        assert err["param"] is None or isinstance(err["param"], str)
        return str(status)
    if body.startswith(b"data: "):
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events[-3:]
        return "200-stream"
    assert json.loads(body)["choices"][0]["finish_reason"] in ("length", "stop")
    return "200"


def test_fuzzed_openai_bodies(served):
    seen: dict[str, int] = {}

    @FUZZ
    @given(openai_bodies())
    def one(path_body):
        path, body = path_body
        r = served.post(path, body)
        out = _check_http(r.status_code, r.content)
        seen[out] = seen.get(out, 0) + 1

    with served.neighbours() as nb:
        one()
    _exact(nb)
    print("http outcomes", seen)
    assert seen.get("400", 0) > 0 and seen.get("200", 0) + seen.get("200-stream", 0) > 0, seen
    _wait_idle(served)


@pytest.mark.parametrize("body,param", [
    ('{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
    ('{"prompt": "hi", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "hi", "temperature": 1e-300}', "temperature"),
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "top_p": Infinity}', "top_p"),
    ('{"prompt": "hi", "max_tokens": true}', "max_tokens"),
    ('{"prompt": "hi", "stop": ["a", "\\udc00"]}', "stop"),
    ('{"prompt": "hi", "stop": ' + json.dumps(["x"] * 17) + "}", "stop"),
    ('{"prompt": "hi", "stop": ' + "[" * 40 + "]" * 40 + "}", "stop"),
    ('{"prompt": "hi", "logprobs": 21}', "logprobs"),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
])
def test_known_bad_bodies_are_400s_naming_the_field(served, body, param):
    for path in ("/v1/completions",) if "messages" not in body else ("/v1/chat/completions",):
        r = served.http.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.json()


def test_a_body_over_the_cap_is_a_413(served):
    big = json.dumps({"prompt": "x" * (served.runner.engine.validator.limits.max_body_bytes + 10)}).encode()
    r = served.http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = served.http.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                         headers={"content-type": "application/json"})
    assert r.status_code == 200
