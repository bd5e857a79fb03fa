"""vLLM's request extensions and routes on the OpenAI API, called with the official `openai` client against uvicorn
over a real engine serving the trained demo model, and checked against the offline LLM and the model's logits."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest
import torch
from openai import OpenAI

from elasticmoe import LLM, SamplingParams, __version__
from elasticmoe.engine.sampling import RowContext, process_logits
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.model import open_model
from elasticmoe.model.embedded import ensure_tiny_model
from tests.openai_util import Core, Server
from tests.store_util import full_store

FOX = "The quick brown fox"
END = "Mountains are covered with snow in winter;"  # the corpus' last sentence: the model then emits EOS
ODD = "Once upon a time"  # not in the corpus: the model is unsure, so a penalty flips its greedy choice early


@pytest.fixture(scope="module")
def demo():
    path = str(ensure_tiny_model("demo"))
    files = open_model(path)
    store = full_store(files)
    return path, store


@pytest.fixture(scope="module")
def llm(demo):
    return LLM(demo[0])


@pytest.fixture(scope="module")
def served(demo):
    core = Core(*demo, served_model_name="demo", max_num_seqs=8, max_model_len=256)
    core.runner.engine.model.route_observer = core.metrics.route  # as GatewayCore wires it
    server = Server(build_openai_app(core))
    yield core, OpenAI(base_url=server.url, api_key="none", max_retries=0), server.url
    server.stop()
    core.runner.close()


def _ids_of(choice) -> list[int]:
    """Token ids of a completion choice asked with logprobs=0 and return_tokens_as_token_ids."""
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def _complete(client, prompt, **kw):
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    return client.completions.create(model="demo", prompt=prompt, logprobs=0, extra_body=extra, **kw)


def test_greedy_tokens_equal_the_offline_llm(served, llm):
    _, client, _ = served
    r = _complete(client, FOX, max_tokens=16, temperature=0)
    ref = llm.generate([FOX], SamplingParams(max_tokens=16, temperature=0))[0]
    assert _ids_of(r.choices[0]) == ref.token_ids and r.choices[0].text == ref.text
    assert r.choices[0].text.startswith(" jumps over the lazy dog")


@pytest.mark.parametrize("kw", [dict(frequency_penalty=2.0), dict(presence_penalty=2.0),
                                dict(extra_body={"repetition_penalty": 3.0})],
                         ids=["frequency", "presence", "repetition"])
def test_a_penalty_changes_greedy_output_as_defined(served, llm, kw):
    _, client, _ = served
    plain = _complete(client, ODD, max_tokens=40, temperature=0)
    got = _complete(client, ODD, max_tokens=40, temperature=0, **kw)
    ids = _ids_of(got.choices[0])
    assert ids != _ids_of(plain.choices[0])
    params = SamplingParams(max_tokens=40, temperature=0, frequency_penalty=kw.get("frequency_penalty", 0.0),
                            presence_penalty=kw.get("presence_penalty", 0.0),
                            repetition_penalty=kw.get("extra_body", {}).get("repetition_penalty", 1.0))
    assert llm.generate([ODD], params)[0].token_ids == ids
    # each token is the argmax of the model's logits after the penalty, as OpenAI / vLLM define it
    prompt = llm.encode(ODD)
    logits = llm.logits(prompt + ids)[len(prompt) - 1:]  # [n + 1, V]: row j predicts output token j
    for j, tok in enumerate(ids):
        counts = torch.bincount(torch.tensor(ids[:j], dtype=torch.long), minlength=logits.shape[1]).float()
        row = logits[j].clone()
        seen = torch.tensor(sorted(set(prompt) | set(ids[:j])))
        r = params.repetition_penalty
        row[seen] = torch.where(row[seen] > 0, row[seen] / r, row[seen] * r)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        assert int(row.argmax()) == tok, j


def test_process_logits_formula():
    row = torch.tensor([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0, logit_bias={2: 1.0})
    out = process_logits(row, p, RowContext(prompt_ids=[0], output_ids=[1, 1, 3]))
    # repetition over {0, 1, 3}: 2/2, -1*2, 3/2; then frequency/presence over the output {1: 2, 3: 1}; bias on 2
    assert out.tolist() == [1.0, -2.0 - 1.0 - 0.25, 1.5, 1.5 - 0.5 - 0.25]
    banned = process_logits(row, SamplingParams(min_tokens=2), RowContext([0], [], banned=(3,)))
    assert banned[3] == float("-inf") and banned[:3].tolist() == row[:3].tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_with_a_seed_are_reproducible(served, llm, stream):
    _, client, _ = served
    kw = dict(model="demo", prompt=FOX, max_tokens=12, temperature=1.0, n=3, seed=1234)

    def run() -> list[str]:
        if not stream:
            r = client.completions.create(**kw)
            assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 36
            return [c.text for c in r.choices]
        texts = ["", "", ""]
        for c in client.completions.create(**kw, stream=True):
            for ch in c.choices:
                texts[ch.index] += ch.text
        return texts

    first, second = run(), run()
    assert first == second and len(set(first)) > 1  # reproducible, and the choices differ
    for i, text in enumerate(first):  # choice i samples with seed + i
        ref = llm.generate([FOX], SamplingParams(max_tokens=12, temperature=1.0, seed=1234 + i))[0]
        assert text == ref.text


def test_min_tokens_suppresses_eos(served):
    _, client, _ = served
    free = client.completions.create(model="demo", prompt=END, max_tokens=48, temperature=0)
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens == 24  # EOS after the sentence
    held = client.completions.create(model="demo", prompt=END, max_tokens=48, temperature=0,
                                     extra_body={"min_tokens": 32})
    assert held.usage.completion_tokens >= 32 and held.choices[0].text.startswith(free.choices[0].text)


def test_stop_token_ids_logit_bias_and_min_p(served, llm):
    _, client, _ = served
    ref = llm.generate([FOX], SamplingParams(max_tokens=16, temperature=0))[0].token_ids
    r = _complete(client, FOX, max_tokens=16, temperature=0, extra_body={"stop_token_ids": [ref[3]]})
    assert _ids_of(r.choices[0]) == ref[:4] and r.choices[0].finish_reason == "stop"
    target = llm.encode(" cat")[0]
    r = _complete(client, FOX, max_tokens=1, temperature=0, logit_bias={str(target): 100})
    assert _ids_of(r.choices[0]) == [target]
    r = _complete(client, FOX, max_tokens=16, temperature=1.0, seed=7, extra_body={"min_p": 1.0})
    assert _ids_of(r.choices[0]) == ref  # only the most likely token survives min_p = 1


def test_continuous_usage_stats_in_every_chunk(served):
    _, client, _ = served
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=20, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    done = [c.usage.completion_tokens for c in chunks]
    assert done == sorted(done) and done[-1] == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."


def test_unknown_nested_field_is_named_with_its_path(served):
    _, client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=FOX, stream=True,
                                  stream_options={"include_usage": True, "foo": 1})
    assert e.value.body["param"] == "stream_options.foo" and "stream_options.foo" in e.value.body["message"]


def _http(url: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url.rsplit("/v1", 1)[0] + path, method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def test_version_metrics_tokenize_detokenize(served, llm):
    core, client, url = served
    assert json.loads(_http(url, "/version")[1]) == {"version": __version__}
    client.completions.create(model="demo", prompt=FOX, max_tokens=2)
    status, text = _http(url, "/metrics")
    lines = text.decode().splitlines()
    ok = core.metrics.requests[("http", "ok")]
    assert status == 200 and f'elasticmoe_requests_total{{api="http",status="ok"}} {ok}' in lines
    assert any(line.startswith("elasticmoe_expert_tokens_total{layer=") for line in lines)
    tok = json.loads(_http(url, "/tokenize", {"prompt": FOX, "return_token_strs": True})[1])
    assert tok["tokens"] == llm.encode(FOX) and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert tok["token_strs"] == llm.tokenizer.convert_ids_to_tokens(tok["tokens"])
    assert json.loads(_http(url, "/detokenize", {"tokens": tok["tokens"]})[1]) == {"prompt": FOX}
    chat = json.loads(_http(url, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})[1])
    assert chat["tokens"][0] == llm.tokenizer.bos_token_id


def test_tokenize_honours_add_generation_prompt(served, llm):
    """/tokenize of chat messages: the assistant's generation prompt only when add_generation_prompt (default)."""
    _, _, url = served
    msgs = [{"role": "user", "content": "Hi"}]
    got = {}
    for add in (True, False):
        want = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=add, tokenize=True)
        got[add] = json.loads(_http(url, "/tokenize", {"messages": msgs, "add_generation_prompt": add})[1])["tokens"]
        assert got[add] == list(want if isinstance(want, list) else want["input_ids"]), add
    assert len(got[False]) < len(got[True])
    assert json.loads(_http(url, "/tokenize", {"messages": msgs})[1])["tokens"] == got[True]


@pytest.fixture(scope="module")
def bos_served(tmp_path_factory):
    """A tiny checkpoint whose tokenizer.json adds BOS to every encoded text (a TemplateProcessing post-processor,
    as Llama's does), served over uvicorn."""
    from tokenizers import Tokenizer, processors

    from elasticmoe.model.tiny import make_tiny_model

    path = make_tiny_model("mixtral", tmp_path_factory.mktemp("bos") / "mixtral", layers=1, experts=2)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    files = open_model(str(path))
    store = full_store(files)
    core = Core(str(path), store, max_num_seqs=2, max_model_len=64)
    server = Server(build_openai_app(core))
    yield core, server.url
    server.stop()
    core.runner.close()


def test_tokenize_honours_add_special_tokens(bos_served):
    """/tokenize of a prompt adds the tokenizer's special tokens (BOS here) unless add_special_tokens is false."""
    core, url = bos_served
    bos, plain = core.tokenizer.bos_token_id, core.tokenizer.encode(FOX, add_special_tokens=False)
    assert plain[0] != bos
    got = {add: json.loads(_http(url, "/tokenize", {"prompt": FOX, "add_special_tokens": add})[1])
           for add in (True, False)}
    assert got[True]["tokens"] == [bos, *plain] and got[True]["count"] == len(plain) + 1
    assert got[False]["tokens"] == plain and got[False]["count"] == len(plain)
    assert json.loads(_http(url, "/tokenize", {"prompt": FOX})[1])["tokens"] == got[True]["tokens"]


def test_a_chat_prompt_holds_one_bos_where_the_tokenizer_would_add_another(bos_served):
    """The template writes BOS and this tokenizer adds one to every text it encodes with special tokens: the
    rendered chat is tokenized without them, as transformers' apply_chat_template does, so it starts with one."""
    core, url = bos_served
    tok, msgs = core.tokenizer, [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # what adding special tokens would give
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = list(want if isinstance(want, list) else want["input_ids"])
    got = json.loads(_http(url, "/tokenize", {"messages": msgs})[1])["tokens"]
    assert got == want and want.count(tok.bos_token_id) == 1
    chat = json.loads(_http(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})[1])
    assert chat["usage"]["prompt_tokens"] == len(want)


def test_generation_config_supplies_defaults_and_eos_ids(demo):
    from elasticmoe.engine.checkpoint_defaults import generation_config

    defaults, eos = generation_config(demo[0])
    assert defaults == {} and eos == {2, 4}  # </s> and <|im_end|>: chat answers end on the latter


def test_chat_n_choices_streamed_equal_unstreamed(served):
    _, client, _ = served
    kw = dict(model="demo", messages=[{"role": "user", "content": "Hello! How are you today?"}], max_tokens=10,
              temperature=1.0, n=2, seed=99, frequency_penalty=0.5, extra_body={"min_tokens": 3})
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1] and whole.usage.completion_tokens >= 6
    texts, roles = ["", ""], set()
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1} and texts == [c.message.content for c in whole.choices]


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"prompt": FOX, "messages": [{"role": "user", "content": "Hi"}]}),  # a bad field
    ("/detokenize", {"tokens": [-1]}),  # a bad field
    ("/tokenize", {"prompt": 5}),  # a body that does not parse
])
def test_a_400_from_tokenize_or_detokenize_is_counted_as_the_other_routes_count_it(served, path, body):
    core, _, url = served
    before = (core.metrics.requests.get(("http", "invalid"), 0), core.metrics.errors.get("400", 0))
    with pytest.raises(urllib.error.HTTPError) as e:
        _http(url, path, body)
    assert e.value.code == 400
    assert (core.metrics.requests.get(("http", "invalid"), 0), core.metrics.errors.get("400", 0)) == \
        (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": FOX}),
                                       ("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}),
                                       ("/detokenize", {"tokens": [5, 6, 7]})])
def test_a_tokenize_or_detokenize_answered_counts_once_as_ok(served, path, body):
    """Their 400s count in elasticmoe_requests_total (the test above), so their answers must too: counted only when
    they failed, these routes read as failing every time in the dashboard's error ratio and invalid share. No
    latency is observed (they generate nothing)."""
    core, _, url = served
    before = core.metrics.counts()
    assert _http(url, path, body)[0] == 200
    requests, errors, latency = core.metrics.counts()
    assert requests.get(("http", "ok"), 0) == before[0].get(("http", "ok"), 0) + 1
    assert sum(requests.values()) == sum(before[0].values()) + 1
    assert (errors, latency) == before[1:]
