"""The checkpoint's generation_config.json as vLLM reads it: its sampling defaults for the offline LLM and the HTTP
API, over a tiny Mixtral written by transformers."""

from __future__ import annotations

import json
import shutil

import pytest
from openai import OpenAI

from elasticmoe import LLM, SamplingParams
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.openai_protocol import CompletionRequest, sampling_params
from elasticmoe.model.tiny import make_tiny_model
from tests.openai_util import Core, Server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("gc") / "mixtral", layers=1, experts=4)


def _with_generation_config(checkpoint, tmp_path, **values):
    path = tmp_path / "m"
    shutil.copytree(checkpoint, path)
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **values}))
    return LLM(str(path))


def test_a_float_top_k_is_taken_as_the_integer_it_is(checkpoint, tmp_path):
    """generation_config.json files write top_k as 20.0 too; that float made every request that left top_k to the
    checkpoint invalid ("top_k: must be an integer"), offline and over HTTP. It is now top_k 20."""
    llm = _with_generation_config(checkpoint, tmp_path, top_k=20.0, temperature=0.6)
    assert llm.get_default_sampling_params() == SamplingParams(top_k=20, temperature=0.6)
    assert llm.generate(["The expert said"])[0].token_ids
    params = sampling_params(CompletionRequest(prompt="x"), 16, None, llm.engine.generation_defaults)
    assert (params.top_k, params.temperature) == (20, 0.6)


def test_default_max_tokens_without_a_generation_config_value_is_cut_to_the_context(checkpoint):
    """Without sampling_params and without max_new_tokens in generation_config.json, `generate` took
    SamplingParams()'s 16 uncut: a prompt within the context but 16 tokens short of its end was refused naming
    max_tokens, a field the caller never set (the gRPC door cuts its unset default, vLLM's LLM does not refuse).
    The default is now cut to the context the prompt leaves, as README documents for the checkpoint's value."""
    short = LLM(str(checkpoint), max_model_len=8)
    assert "max_tokens" not in short.engine.generation_defaults
    ids = short.encode("Once upon a time, the expert said")[:6]
    [o] = short.generate([ids])
    assert len(o.token_ids) <= 2 and o.finish_reason in ("length", "eos")

def test_max_new_tokens_is_the_default_max_tokens_as_in_vllm(checkpoint, tmp_path):
    """vLLM takes generation_config.json's max_new_tokens as the default max_tokens; it was ignored (16 tokens
    offline and on /v1/completions, the whole context on chat). Offline without sampling_params: max_tokens 5,
    cut to the context left where that is less; over HTTP, a request without max_tokens: 5 on both endpoints."""
    llm = _with_generation_config(checkpoint, tmp_path, max_new_tokens=5.0, temperature=0.0)
    assert llm.get_default_sampling_params() == SamplingParams(max_tokens=5, temperature=0.0)
    prompts = ["The expert said", "Once upon a time"]
    out = llm.generate(prompts)
    assert [o.token_ids for o in out] == [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=5,
                                                                                                  temperature=0.0))]
    assert all(len(o.token_ids) == 5 or o.finish_reason == "eos" for o in out)
    short = LLM(str(tmp_path / "m"), max_model_len=8)
    [o] = short.generate([short.encode(prompts[0])[:6]])
    assert len(o.token_ids) <= 2
    core = Core(str(tmp_path / "m"), llm.store, max_num_seqs=2, max_model_len=64)
    server = Server(build_openai_app(core))
    try:
        client = OpenAI(base_url=server.url, api_key="none", max_retries=0)
        extra = {"ignore_eos": True}
        c = client.completions.create(model="m", prompt=prompts[0], extra_body=extra)
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                              extra_body=extra)
        assert (c.usage.completion_tokens, chat.usage.completion_tokens) == (5, 5)
        c = client.completions.create(model="m", prompt=prompts[0], max_tokens=7, extra_body=extra)
        assert c.usage.completion_tokens == 7
    finally:
        server.stop()
        core.runner.close()


def test_a_checkpoint_given_as_a_path_object_opens(checkpoint):
    """LLM(pathlib.Path(...)) raised AttributeError ('PosixPath' has no attribute 'startswith'); a path object is
    taken as its string is, with the same answer."""
    assert not isinstance(checkpoint, str)
    params = SamplingParams(max_tokens=4, temperature=0)
    by_path, by_str = (LLM(m).generate(["Hi"], params)[0].token_ids for m in (checkpoint, str(checkpoint)))
    assert by_path == by_str and len(by_path) == 4


def test_eos_ids_outside_the_vocabulary_are_ignored_with_a_warning(checkpoint, tmp_path, caplog):
    """An EOS id at or past the vocabulary size (or negative) in generation_config.json or config.json made every
    request with min_tokens fail (its EOS ban indexes the logits). transformers' generate ignores such ids (its EOS
    masks and stopping criteria match only ids the logits have); so does the engine now, warning at load with the
    file and field: the requests get the tokens they get from the checkpoint without those ids."""
    path = tmp_path / "m"
    shutil.copytree(checkpoint, path)
    cfg, gen = (json.loads((path / f).read_text()) for f in ("config.json", "generation_config.json"))
    vocab, eos = cfg["vocab_size"], cfg["eos_token_id"]
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [eos, vocab + 1]}))
    gen_eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": gen_eos + [vocab, vocab + 7, -1]}))
    with caplog.at_level("WARNING", logger="elasticmoe.engine.checkpoint_defaults"):
        llm = LLM(str(path))
    clean = LLM(str(checkpoint))
    assert llm.engine.eos_ids == clean.engine.eos_ids and eos in clean.engine.eos_ids
    said = [r.getMessage() for r in caplog.records]
    for where, bad in (("config.json", vocab + 1), ("generation_config.json", vocab),
                       ("generation_config.json", vocab + 7), ("generation_config.json", -1)):
        assert any(f"/{where} eos_token_id: EOS id {bad} is outside the vocabulary" in m for m in said), (where, said)
    params = SamplingParams(max_tokens=6, min_tokens=4, temperature=0.0)
    prompts = ["The expert said", "Once upon a time"]
    got, want = (m.generate(prompts, params) for m in (llm, clean))
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
