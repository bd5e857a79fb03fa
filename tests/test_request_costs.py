"""What one client request can make the server spend: memory and CPU that grow with a value the client controls are
bounded by the request's size or by a limit, and a request over a limit is a 400 naming the field whose message does
not grow with the input (in process: the HTTP app over a real engine, tiny Mixtral)."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from fastapi.testclient import TestClient

from elasticmoe.config import AppArgs, Limits
from elasticmoe.engine.detok import BYTE_RUN_TOKENS, REPLACEMENT, STUCK_TOKENS, Detokenizer
from elasticmoe.engine.sampling import InvalidRequest, SamplingParams, process_logits
from elasticmoe.engine.validation import RequestLimits, Validator
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.gateway.openai_body import parse_body
from tests.openai_util import Core, model  # noqa: F401 - the fixture
from tests.test_detok import _sentencepiece_like

KEY = "k" * 100_000  # a key of 100 kB: nothing answered or held may repeat it per value


@pytest.fixture(scope="module")
def http(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=2048, limits=RequestLimits(max_prompt_bytes=4096))
    client = TestClient(build_openai_app(core), raise_server_exceptions=False)
    yield core, client
    client.close()
    core.runner.close()


def _post(client: TestClient, path: str, body: dict):
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_walking_a_body_holds_no_path_per_value():
    """A 72 kB body (a 64 kB key over 4,000 values) used to hold the key's path once per value: 256 MB."""
    body = json.dumps({"metadata": {"k" * 65536: [0] * 4000}}).encode()
    tracemalloc.start()
    try:
        parse_body(body, 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{len(body)} bytes of body held {peak} bytes"


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "metadata": {KEY: 5}},
    {"prompt": "hi", "stream": True, "stream_options": {KEY: True}},
    {"prompt": "hi", "logit_bias": {KEY: "x"}},
    {"prompt": "hi", "metadata": {KEY: {"a": "\ud800"}}},
    {"prompt": "hi", "metadata": {KEY: json.loads("[" * 40 + "]" * 40)}},
], ids=["wrong-type", "unknown-field", "logit-bias-value", "lone-surrogate", "too-deep"])
def test_an_error_does_not_repeat_a_long_key(http, body):
    r = _post(http[1], "/v1/completions", body)
    assert r.status_code == 400 and len(r.text) < 1000, (r.status_code, len(r.text), r.text[:300])
    err = r.json()["error"]
    assert err["param"].split(".")[0].split("[")[0] in {"metadata", "stream_options", "logit_bias"}, err


def test_a_long_url_is_not_repeated_in_the_404(http):
    r = http[1].get("/v1/" + "a" * 20_000)
    assert r.status_code == 404 and len(r.text) < 1000, (r.status_code, len(r.text))


def test_a_logit_bias_key_too_long_for_an_integer_is_a_400_naming_it(http):
    """Python refuses int() of more than 4,300 digits: that was a 500."""
    r = _post(http[1], "/v1/completions", {"prompt": "hi", "max_tokens": 1, "logit_bias": {"1" * 5000: 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text[:300]
    assert len(r.text) < 1000


def test_the_rendered_conversation_is_held_to_max_prompt_bytes(http):
    """Empty messages hold no content but each renders a header: 250 of them render about 7.5 kB, tokenized on the
    event loop, while max_prompt_bytes (4096 here) bounds what a text prompt may make the tokenizer read."""
    core, client = http
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(250)]
    r = _post(client, "/tokenize", {"messages": messages})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["param"] == "messages" and "4096" in err["message"] and "bytes" in err["message"], err
    r = _post(client, "/tokenize", {"messages": messages[:20]})  # one that fits is tokenized as before
    conv = [{"role": m["role"], "content": ""} for m in messages[:20]]
    ids = core.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert r.status_code == 200 and r.json()["tokens"] == list(ids)


def _torch_calls(fn) -> int:
    """How many torch functions and tensor methods `fn()` calls (Python-level work per call)."""
    class Count(torch.overrides.TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_logit_bias_costs_each_step_the_same_whatever_its_size():
    """Applied on the engine thread to every row of every step: 1,024 entries used to be 1,024 indexed adds (about
    5 ms a row on CPU, more kernel launches on a GPU), paid by every request in the batch."""
    row = torch.randn(512)
    small = SamplingParams(max_tokens=4, logit_bias={3: 1.0})
    big = SamplingParams(max_tokens=4, logit_bias={i: 0.5 for i in range(0, 512, 2)})
    assert _torch_calls(lambda: process_logits(row, big, None)) == _torch_calls(lambda: process_logits(row, small,
                                                                                                     None))
    out = process_logits(row, big, None)
    assert torch.equal(out[0::2], row[0::2] + 0.5) and torch.equal(out[1::2], row[1::2])


@pytest.mark.parametrize("body, param, limit", [
    ({"stop_token_ids": [1] * 17}, "stop_token_ids", 16),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", 1024),
])
def test_stop_token_ids_and_logit_bias_over_their_limit_are_400s_naming_it(http, body, param, limit):
    r = _post(http[1], "/v1/completions", {"prompt": "hi", "max_tokens": 1, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, r.text[:300]
    assert f"the limit is {limit}" in err["message"] and f"limits.max_{param}" in err["message"], err


def test_the_limits_of_stop_token_ids_and_logit_bias_come_from_app_args():
    lim = RequestLimits.of(AppArgs(model="m", limits=Limits(max_stop_token_ids=2, max_logit_bias=3)).limits)
    v = Validator(vocab_size=100, max_model_len=32, limits=lim)
    v.request([1], SamplingParams(max_tokens=4, stop_token_ids=(1, 2), logit_bias={1: 1.0, 2: 1.0, 3: 1.0}))
    for kw, field in [({"stop_token_ids": (1, 2, 3)}, "stop_token_ids"),
                      ({"logit_bias": {i: 1.0 for i in range(4)}}, "logit_bias")]:
        with pytest.raises(InvalidRequest, match="the limit is") as e:
            v.request([1], SamplingParams(max_tokens=4, **kw))
        assert e.value.field == field
    assert RequestLimits.of(Limits()).max_stop_token_ids == 16 and RequestLimits.of(Limits()).max_logit_bias == 1024


@pytest.mark.parametrize("text", ["", "中文字符" * 8], ids=["invalid-bytes", "valid-then-invalid"])
def test_an_endless_run_of_byte_tokens_decodes_a_bounded_window(text):
    """A byte-fallback tokenizer (Llama 2, Mistral, Mixtral) renders a run of <0xXX> tokens whole, so the run used to
    stay pending and each token decoded all of it (4,000 tokens: 8 million decoded, seconds of the engine thread);
    logit_bias on <0x80> makes such a run as long as max_tokens. A run longer than BYTE_RUN_TOKENS is now made
    stable where it splits exactly: invalid bytes are U+FFFD each, as a full decode renders them."""
    tok = _sentencepiece_like()
    lead = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    ids = tok.encode("The sea", add_special_tokens=False) + lead + [tok.convert_tokens_to_ids("<0x80>")] * 2000
    d = Detokenizer(tok, ("never appears",))
    streamed = ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
    assert d.max_window <= BYTE_RUN_TOKENS + STUCK_TOKENS + 8 and d.decoded_tokens <= 40 * len(ids), (
        d.max_window, d.decoded_tokens)
    assert d.text.endswith(REPLACEMENT * 2000) and streamed + d.delta(final=True) == d.text
    if not text:  # all the run's bytes invalid: exactly a full decode
        assert d.text == tok.decode(ids, skip_special_tokens=True)
    else:  # the documented exception: the run's first p > BYTE_RUN_TOKENS bytes (whole characters) keep their text,
        kept = d.text.rstrip(REPLACEMENT)  # every later byte is one U+FFFD (a full decode: all of them U+FFFD)
        part = kept.removeprefix("The sea")
        p = len(part.encode("utf-8"))
        assert text.startswith(part) and p > BYTE_RUN_TOKENS, kept
        assert d.text == kept + REPLACEMENT * (len(text.encode("utf-8")) - p + 2000)


def test_a_long_run_of_valid_bytes_still_decodes_as_a_whole():
    """Splitting a long run happens only where exact: 90 byte tokens of CJK text come out as that text."""
    tok = _sentencepiece_like()
    run = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in ("中文字符" * 8 + "😀" * 2).encode("utf-8")]
    ids = tok.encode("The sea", add_special_tokens=False) + run + tok.encode(" ok", add_special_tokens=False)
    d = Detokenizer(tok, ())
    streamed = ""
    for n in range(1, len(ids) + 1):
        d.update(ids[:n])
        streamed += d.delta()
    assert d.text == tok.decode(ids, skip_special_tokens=True) == streamed + d.delta(final=True)


class _CountingTokenizer:
    """A real tokenizer, its decode calls counted (what the logprobs formatting asks of it)."""

    def __init__(self, tok):
        self.tok, self.decodes, self.batches = tok, 0, 0

    def decode(self, ids, **kw):
        self.decodes += 1
        return self.tok.decode(ids, **kw)

    def batch_decode(self, seqs, **kw):
        self.batches += 1
        return self.tok.batch_decode(seqs, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("kind", ["mixtral", "sentencepiece"])
def test_logprobs_are_named_with_one_decode_call_per_response(model, kind):  # noqa: F811
    """The logprobs of a choice (each token and its top alternatives) were named one tokenizer.decode per entry on
    the HTTP event loop: 2k tokens x 20 alternatives held the loop about a second, every other request waiting.
    Each distinct id is now decoded once, in one batch_decode; the answer is what the per-entry decodes gave."""
    from transformers import AutoTokenizer

    from elasticmoe.engine.sampling import TokenLogprob
    from elasticmoe.gateway.openai_shapes import chat_logprobs, completion_logprobs

    tok = AutoTokenizer.from_pretrained(model[0]) if kind == "mixtral" else _sentencepiece_like()
    gen = torch.Generator().manual_seed(0)
    vocab = min(len(tok), 300)
    ids = torch.randint(0, vocab, (200, 6), generator=gen).tolist()  # [tokens, 1 sampled + 5 alternatives]
    lps = [TokenLogprob(row[0], -0.5, [(t, -1.0 - j) for j, t in enumerate(row[1:])]) for row in ids]
    for fmt in (lambda t: completion_logprobs(t, lps, 0)[0], lambda t: chat_logprobs(t, lps)):
        counting = _CountingTokenizer(tok)
        got = fmt(counting)
        assert counting.decodes == 0 and counting.batches == 1
        decode = tok.decode
        want_names = {i: decode([i]) for row in ids for i in row}
        if "content" in got:  # chat: each entry's token is its own decode
            assert [e["token"] for e in got["content"]] == [want_names[row[0]] for row in ids]
            assert [[a["token"] for a in e["top_logprobs"]] for e in got["content"]] == \
                [[want_names[t] for t in row[1:]] for row in ids]
        else:
            assert got["tokens"] == [want_names[row[0]] for row in ids]
            assert [set(d) for d in got["top_logprobs"]] == \
                [{want_names[t] for t in row} for row in ids]


def _penalised(row: torch.Tensor, p: SamplingParams, prompt: list[int], out: list[int]) -> torch.Tensor:
    """The penalties as their definitions read (the reference: a set of the whole context, per call)."""
    row = row.clone()
    seen = torch.tensor(sorted(set(prompt) | set(out)))
    vals = row[seen]
    row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if out:
        counts = torch.bincount(torch.tensor(out), minlength=row.shape[0]).to(row)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row)
    return row


def test_penalties_kept_across_steps_equal_their_definition():
    """The penalties' inputs are kept per sequence and updated with each step's new tokens (PenaltyState); every
    step's row equals the definition's, also after the output was cut back (a rolled-back step)."""
    from elasticmoe.engine.sampling import PenaltyState, RowContext

    gen = torch.Generator().manual_seed(0)
    vocab = 300
    p = SamplingParams(max_tokens=64, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2)
    prompt = torch.randint(0, vocab, (40,), generator=gen).tolist()
    out: list[int] = []
    state = PenaltyState()
    for step in range(40):
        row = torch.randn(vocab, generator=gen)
        got = process_logits(row, p, RowContext(prompt, out, (), state))
        assert torch.equal(got, _penalised(row, p, prompt, out)), step
        out.append(int(torch.randint(0, vocab, (1,), generator=gen)))
        if step == 25:
            del out[-5:]  # cut back: the kept counts must not count what went


def test_a_long_prompt_costs_the_penalties_nothing_after_the_first_step():
    """repetition_penalty (often set by a checkpoint's generation_config, so on every request) rebuilt a set and a
    sorted list of the whole prompt for every row at every step on the engine thread; now a step allocates for its
    new tokens only."""
    from elasticmoe.engine.sampling import PenaltyState, RowContext

    vocab = 60_000
    prompt = list(range(50_000))  # 50k distinct ids
    p = SamplingParams(max_tokens=8, repetition_penalty=1.1, frequency_penalty=0.1)
    state, out = PenaltyState(), [7]
    row = torch.randn(vocab)
    process_logits(row, p, RowContext(prompt, out, (), state))  # the first step builds the state
    out.append(9)
    tracemalloc.start()
    got = process_logits(row, p, RowContext(prompt, out, (), state))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 10, f"a step allocated {peak} bytes of Python objects"  # the old set: ~2 MB, the list: 0.4
    assert torch.equal(got, _penalised(row, p, prompt, out))
