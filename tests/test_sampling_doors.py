"""One sampling value means one thing on every front door: the offline LLM, the gRPC port (a real grpc.aio server
over a real engine) and the OpenAI HTTP API (uvicorn) answer the same seeded request with the same tokens, and
refuse the same bad value naming the same field."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest

from elasticmoe import SamplingParams
from elasticmoe.client import GenerationClient, make_request
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from tests.openai_util import Core, Server, llm, model  # noqa: F401 - fixtures

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
SEEDED = dict(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)


class Doors:
    """The three front doors over one engine: `offline(**kw)`, `grpc(**kw)` and `http(**kw)` each answer
    (token ids, text) for PROMPT (or the token ids `ids`) or raise InvalidRequest(field, message) for a refusal."""

    def __init__(self, model, llm):  # noqa: F811
        self.llm, self.ids = llm, llm.encode(PROMPT)
        self.core = Core(*model, max_num_seqs=4, max_model_len=128)
        self.core.api_keys = ApiKeys()
        self.port = DirectIngress(GenerationService(self.core), "127.0.0.1", 0, max_rpcs=16)
        self.client = GenerationClient(self.port.address, timeout_s=60)
        self.server = Server(build_openai_app(self.core))

    def close(self) -> None:
        self.client.close()
        self.port.stop(0)
        self.server.stop()
        self.core.runner.close()

    def offline(self, ids: list[int] | None = None, **kw) -> tuple[list[int], str]:
        out = self.llm.generate([ids or self.ids], SamplingParams(**kw))[0]
        return list(out.token_ids), out.text

    def grpc(self, ids: list[int] | None = None, **kw) -> tuple[list[int], str]:
        try:
            r = self.client.generate(prompt_token_ids=ids or self.ids, **kw)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            field, _, message = e.details().partition(": ")
            raise InvalidRequest(field, message) from None
        return list(r.token_ids), r.text

    def http(self, ids: list[int] | None = None, **kw) -> tuple[list[int], str]:
        body = json.dumps({"model": "mixtral", "prompt": ids or self.ids, "logprobs": 0,
                           "return_tokens_as_token_ids": True, **kw})
        req = urllib.request.Request(self.server.url + "/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                choice = json.loads(r.read())["choices"][0]
        except urllib.error.HTTPError as e:
            assert e.code == 400, e
            err = json.loads(e.read())["error"]
            raise InvalidRequest(err["param"], err["message"].partition(": ")[2]) from None
        return [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]], choice["text"]

    def all(self, **kw) -> list:
        """Each door's answer, or its refusal as ("refused", field, message)."""
        out = []
        for door in (self.offline, self.grpc, self.http):
            try:
                out.append(door(**kw))
            except InvalidRequest as e:
                out.append(("refused", e.field, e.message))
        return out


@pytest.fixture(scope="module")
def doors(model, llm):  # noqa: F811
    d = Doors(model, llm)
    yield d
    d.close()


def test_top_k_minus_one_means_off_on_every_door(doors):
    """vLLM's and SGLang's top_k=-1 ("off", as 0 is here) was refused offline and over gRPC ("must be in
    [0, ...]") while HTTP took it as off; every door now samples it as top_k=0, and refuses -2 alike."""
    off = doors.offline(top_k=0, **SEEDED)
    assert doors.all(top_k=-1, **SEEDED) == [off] * 3
    assert doors.all(top_k=0, **SEEDED) == [off] * 3
    assert SamplingParams(top_k=-1) == SamplingParams()
    refused = doors.all(top_k=-2, **SEEDED)
    assert refused == [refused[0]] * 3 and refused[0][:2] == ("refused", "top_k"), refused
    assert "-1" in refused[0][2], refused  # the message names the value that means off


def test_an_unset_max_tokens_is_cut_to_the_context_left_on_every_door(doors):
    """/v1/completions took OpenAI's default of 16 uncut: a prompt 4 tokens short of the context was a 400 naming
    max_tokens, a field the client never sent, where the gRPC door (and vLLM's completions) cut the default to
    the context left. Both now answer the same 4 tokens."""
    ids = (doors.ids * 10)[:124]  # the doors' context is 128
    greedy = dict(temperature=0.0, ignore_eos=True)
    grpc_answer = doors.grpc(ids, **greedy)
    assert len(grpc_answer[0]) == 4
    assert doors.http(ids, **greedy) == grpc_answer


def test_a_negative_seed_samples_alike_on_every_door(doors):
    """A seed may be negative offline and over HTTP (vLLM's and OpenAI's seeds are signed); the gRPC client
    raised protobuf's "Value out of range: -5", naming no field, as it did for any value the proto cannot carry.
    It now sends a negative seed as the unsigned 64 bits torch seeds with, so all three doors answer alike, and
    a value out of the proto's range is a ValueError naming its field (a stop that is no list of strings too: stop=5
    was a TypeError naming nothing)."""
    answers = doors.all(**{**SEEDED, "seed": -5})
    assert answers == [answers[0]] * 3 and answers[0][0] != "refused", answers
    assert answers[0] == doors.offline(**{**SEEDED, "seed": 2**64 - 5})
    for kw in ({"top_k": 2**31}, {"seed": -2**63 - 1}, {"seed": 2**64}, {"temperature": "hot"}, {"stop": 5}):
        with pytest.raises(ValueError, match=f"^{next(iter(kw))}: "):  # stop=5 was "'int' object is not iterable"
            make_request("hi", **kw)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The three doors over a checkpoint whose generation_config.json sets sampling defaults (as Qwen's do)."""
    from elasticmoe import LLM
    from elasticmoe.model import open_model
    from elasticmoe.model.tiny import make_tiny_model
    from tests.store_util import full_store

    path = make_tiny_model("mixtral", tmp_path_factory.mktemp("gc") / "mixtral", layers=2, experts=4)
    cfg = json.loads((path / "generation_config.json").read_text())
    cfg.update(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3, max_new_tokens=6)
    (path / "generation_config.json").write_text(json.dumps(cfg))
    files = open_model(str(path))
    store = full_store(files)
    d = Doors((str(path), store), LLM(str(path)))
    yield d
    d.close()


def test_unset_fields_take_the_checkpoints_generation_config_on_every_door(tuned):
    """HTTP and LLM.generate fill the fields a request leaves unset from generation_config.json (temperature 0.7,
    top_p 0.9, top_k 5, repetition_penalty 1.3, max_new_tokens 6 here; vLLM's `--generation-config auto`), while
    gRPC took its fixed defaults (temperature 1.0, no top-k, 16 tokens): the same request sampled differently on one
    door. Every door now answers a request that sets only its seed with the same 6 tokens."""
    from dataclasses import replace

    defaults = tuned.llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.7, 5, 6)
    out = tuned.llm.generate([tuned.ids], replace(defaults, seed=11, ignore_eos=True))[0]
    want = (list(out.token_ids), out.text)
    assert len(want[0]) == 6
    assert tuned.grpc(seed=11, ignore_eos=True) == want
    assert tuned.http(seed=11, ignore_eos=True) == want
    assert tuned.grpc(seed=11, ignore_eos=True, temperature=0.0) == tuned.offline(  # a set field still wins
        temperature=0.0, top_p=0.9, top_k=5, repetition_penalty=1.3, max_tokens=6, ignore_eos=True, seed=11)
