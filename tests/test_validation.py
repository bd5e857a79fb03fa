"""The validation layer shared by gRPC, HTTP and the offline LLM: every field's type and range, size limits
checked before the work they bound, errors that name the field, and the status each error maps to."""

from __future__ import annotations

import math
import re
import threading
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import make_request
from elasticmoe.config import AppArgs, Limits
from elasticmoe.engine.sampling import InvalidRequest
from elasticmoe.engine.scheduler import QueueFull, RequestFailed
from elasticmoe.engine.validation import GREEDY_BELOW, RequestLimits, Validator
from elasticmoe.gateway.grpc_api import parse_request, status_of
from elasticmoe.model.tiny import make_tiny_model
from elasticmoe.rpc import generation_pb2 as gen


@pytest.mark.parametrize("kw,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": 2**31}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": 1e-45}, "temperature"), ({"temperature": 1e-300}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"top_k": 2**40}, "top_k"), ({"seed": 2**64}, "seed"),
    ({"seed": -2**63 - 1}, "seed"), ({"seed": 1.5}, "seed"), ({"stop": ["ok", ""]}, "stop"),
    ({"stop": "\ud800"}, "stop"), ({"stop": 5}, "stop"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": False}, "logprobs"),
])
def test_bad_sampling_params_name_the_field(kw, field):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.field.split("[")[0] == field and field in str(e.value)


def test_tiny_temperatures_mean_greedy_and_extremes_are_accepted():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(temperature=GREEDY_BELOW / 2).greedy and not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(temperature=1.2e-38).greedy  # a normal float32: greedy, no underflow
    SamplingParams(seed=2**64 - 1), SamplingParams(seed=-2**63), SamplingParams(temperature=1e300)


def test_request_limits_and_context_are_checked():
    v = Validator(vocab_size=100, max_model_len=32, limits=RequestLimits(max_stop_strings=2, max_stop_len=5,
                                                                        max_request_id_len=8, max_prompt_bytes=10))
    ok = SamplingParams(max_tokens=4)
    v.request([1, 2, 3], ok)
    cases = [
        (lambda: v.request([1], SamplingParams(stop=["a", "b", "c"])), "stop"),
        (lambda: v.request([1], SamplingParams(stop=["abcdef"])), "stop"),
        (lambda: v.request([1], SamplingParams(logprobs=21)), "logprobs"),
        (lambda: v.request([1] * 30, SamplingParams(max_tokens=3)), "max_tokens"),
        (lambda: v.request([1] * 32, ok), "prompt_token_ids"),
        (lambda: v.request([100], ok), "prompt_token_ids"), (lambda: v.request([-1], ok), "prompt_token_ids"),
        (lambda: v.request([True], ok), "prompt_token_ids"), (lambda: v.request([], ok), "prompt_token_ids"),
        (lambda: v.request_id("r" * 9), "request_id"), (lambda: v.request_id("\udfff"), "request_id"),
        (lambda: v.prompt_text("x" * 11), "prompt"), (lambda: v.prompt_text("é" * 6), "prompt"),
        (lambda: v.prompt_text(""), "prompt"), (lambda: v.prompt_text("a\ud800"), "prompt"),
        (lambda: v.prompt_text(b"bytes"), "prompt"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidRequest) as e:
            call()
        assert e.value.field == field, (field, e.value)


def test_limits_come_from_app_args():
    lim = AppArgs(model="m", limits=Limits(max_stop_strings=3, max_body_bytes=4096, max_prompt_tokens=7)).limits
    r = RequestLimits.of(lim)
    assert (r.max_stop_strings, r.max_body_bytes, r.max_prompt_tokens, r.max_logprobs) == (3, 4096, 7, 20)
    assert Validator(50, 100, r).max_prompt_tokens == 7 and Validator(50, 5, r).max_prompt_tokens == 4


class CountingTokenizer:
    """A tokenizer that records whether it was asked (size limits must be checked first)."""

    calls = 0

    def encode(self, text, add_special_tokens=True):
        self.calls += 1
        return [ord(c) % 50 for c in text]


def _req(**kw) -> gen.GenerateRequest:
    s = kw.pop("sampling", {})
    return gen.GenerateRequest(sampling=gen.SamplingParams(**s), **kw)


@pytest.mark.parametrize("req,field", [
    (_req(), "prompt"), (_req(prompt="hi", prompt_token_ids=[1]), "prompt"), (_req(prompt=""), "prompt"),
    (_req(prompt="x" * 2000), "prompt"), (_req(prompt="hi", request_id="r" * 300), "request_id"),
    (_req(prompt="hi", sampling={"stop": ["s"] * 20}), "stop"), (_req(prompt_token_ids=[1] * 200), "prompt_token_ids"),
    (_req(prompt="hi", sampling={"temperature": 1e-45}), "temperature"),
    (_req(prompt="hi", sampling={"temperature": math.nan}), "temperature"),
    (_req(prompt="hi", sampling={"logprobs": 2**32 - 1}), "logprobs"),
    (_req(prompt="hi", sampling={"max_tokens": -5}), "max_tokens"),
])
def test_grpc_requests_are_checked_before_tokenizing(req, field):
    tok = CountingTokenizer()
    v = Validator(50, 128, RequestLimits(max_prompt_bytes=1000))
    with pytest.raises(InvalidRequest) as e:
        parse_request(req, tok, v)
    assert e.value.field == field
    if field != "temperature" and field != "logprobs" and field != "max_tokens":
        assert tok.calls == 0  # refused before any work that grows with the input


def test_a_grpc_text_prompt_over_the_token_limit_names_prompt():
    """The client sent `prompt` (text within the byte limit): the error names that field, not prompt_token_ids."""
    v = Validator(50, 128, RequestLimits(max_prompt_bytes=1000))
    with pytest.raises(InvalidRequest) as e:
        parse_request(_req(prompt="x" * 200), CountingTokenizer(), v)
    assert e.value.field == "prompt" and "200 tokens; the limit is 127" in str(e.value)


def test_grpc_default_max_tokens_is_capped_by_the_context():
    """max_tokens unset (default 16) is capped so prompt + completion fit max_model_len, as generation.proto
    documents; a max_tokens the client sets past the context is still refused naming it."""
    v, tok = Validator(50, 128), CountingTokenizer()
    assert parse_request(_req(prompt_token_ids=[1] * 120), tok, v)[2].max_tokens == 8
    assert parse_request(_req(prompt_token_ids=[1] * 100), tok, v)[2].max_tokens == 16
    with pytest.raises(InvalidRequest) as e:
        parse_request(_req(prompt_token_ids=[1] * 120, sampling={"max_tokens": 16}), tok, v)
    assert e.value.field == "max_tokens"


def test_a_huge_grpc_prompt_is_refused_fast():
    """Refused on its byte count before the tokenizer sees it (a count, not a wall-clock window: a loaded CI host
    can take 0.5 s over anything; the 10 s bound only guards against a hang)."""
    v, tok = Validator(50, 128), CountingTokenizer()
    req = _req(prompt="y" * (v.limits.max_prompt_bytes + 1), sampling={"max_tokens": 1})
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequest, match="bytes"):
        parse_request(req, tok, v)
    assert tok.calls == 0 and time.perf_counter() - t0 < 10.0


def test_grpc_request_ids_need_not_be_unique_and_default_to_fresh_ones():
    v, tok = Validator(50, 128), CountingTokenizer()
    rid, ids, params = parse_request(_req(prompt="hi", sampling={"temperature": 1e-6}), tok, v)
    assert len(rid) == 32 and ids == [ord("h") % 50, ord("i") % 50] and params.greedy
    assert parse_request(_req(prompt="hi", request_id="same"), tok, v)[0] == "same"


def test_the_python_client_sends_a_stop_string_whole():
    """stop="END" is one stop string (as SamplingParams and the OpenAI API take it), not "E", "N" and "D"."""
    assert list(make_request("hi", stop="END").sampling.stop) == ["END"]
    assert list(make_request("hi", stop=["a", "bc"]).sampling.stop) == ["a", "bc"]
    assert list(make_request("hi").sampling.stop) == []


@pytest.mark.parametrize("error,code", [
    (InvalidRequest("top_p", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestFailed("experts"), grpc.StatusCode.UNAVAILABLE), (TimeoutError("not ready"), grpc.StatusCode.UNAVAILABLE),
    (ValueError("secret internals"), grpc.StatusCode.INTERNAL),
])
def test_errors_map_to_grpc_codes_without_raw_internals(error, code):
    got, details, _ = status_of(error)
    assert got == code
    assert "secret internals" not in details


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(-5, 2**40) | st.booleans() | st.floats(), "temperature": st.floats() | st.integers(),
    "top_p": st.floats() | st.text(max_size=3), "top_k": st.integers(-5, 2**40), "seed": st.integers(-2**70, 2**70),
    "stop": st.lists(st.text(max_size=5), max_size=4) | st.text(max_size=5),
    "logprobs": st.integers(-3, 30) | st.none(),
}))
def test_sampling_params_accept_exactly_the_valid_values(kw):
    try:
        p = SamplingParams(**kw)
    except InvalidRequest as e:
        assert e.field.split("[")[0] in kw
        return
    assert 1 <= p.max_tokens < 2**31 and math.isfinite(p.temperature) and p.temperature >= 0
    assert p.temperature == 0 or p.temperature >= 1.1754943508222875e-38
    assert 0 < p.top_p <= 1 and 0 <= p.top_k < 2**31 and all(p.stop)
    assert p.seed is None or -2**63 <= p.seed < 2**64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("val") / "m", layers=1, experts=4)))


def test_the_offline_llm_uses_the_same_checks(llm):
    for prompts, field in [(["a\ud800b"], "prompt"), ([[1, 10**9]], "prompt_token_ids"), ([""], "prompt")]:
        with pytest.raises(InvalidRequest) as e:
            llm.generate(prompts, SamplingParams(max_tokens=2))
        assert e.value.field == field
    out = llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=1e-7, ignore_eos=True))
    ref = llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert out[0].token_ids == ref[0].token_ids


@pytest.mark.parametrize("call,field,got", [
    (lambda m: m.generate(["a", 5]), "prompts[1]", "int"), (lambda m: m.generate([b"ab"]), "prompts[0]", "bytes"),
    (lambda m: m.generate(["a", None, "b"]), "prompts[1]", "NoneType"),
    (lambda m: m.generate(b"ab"), "prompts", "bytes"),
    (lambda m: m.generate(5), "prompts", "int"), (lambda m: m.generate({"a": 1}), "prompts", "dict"),
    (lambda m: m.logits(5), "token_ids", "int"), (lambda m: m.logits(b"ab"), "token_ids", "bytes"),
    (lambda m: m.logits("ab"), "token_ids", "str"),
])
def test_an_offline_prompt_of_the_wrong_type_is_named_with_its_index(llm, call, field, got):
    """`generate(["a", 5])` and `logits(5)` raised a raw TypeError, and bytes were read as token ids (b"ab" as
    [97, 98]); each is now an InvalidRequest naming the argument (and the prompt's index) and the type it got."""
    with pytest.raises(InvalidRequest) as e:
        call(llm)
    assert e.value.field == field and e.value.message.endswith(f"got {got}"), str(e.value)
    assert not llm.engine.has_work() and llm.generate([[1, 2]], SamplingParams(max_tokens=1))[0].token_ids


def test_an_offline_text_prompt_over_the_token_limit_names_prompt(llm):
    """A text prompt within the byte limit but over the token limit: the error names `prompt` (what the caller
    passed), as the gRPC front door does, not prompt_token_ids."""
    limit = llm.engine.validator.max_prompt_tokens
    with pytest.raises(InvalidRequest) as e:
        llm.generate(["word " * (limit + 8)], SamplingParams(max_tokens=2))
    assert e.value.field == "prompt" and f"the limit is {limit}" in str(e.value)


def test_a_greedy_row_with_non_finite_logits_fails_alone():
    """A NaN or +inf in a greedy row's logits (a numerical fault upstream) ends that row's request with an error,
    as a sampled row's does, instead of argmax picking the NaN's index; the other rows keep their tokens."""
    import torch

    from elasticmoe.engine.sampling import sample

    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, float("nan"), 1.0], [float("inf"), 0.0, 1.0], [3.0, 0.0, 1.0]])
    greedy = SamplingParams(temperature=0.0)
    tokens, _, errors = sample(logits, [greedy] * 4, [None] * 4)
    assert tokens == [1, None, None, 0]
    assert errors[0] is None and errors[3] is None
    assert all("not finite" in str(e) for e in errors[1:3])


@pytest.mark.parametrize("model, message", [
    ("", "model"),  # Path("") is ".": the replicas' working directory was taken for the checkpoint
    ("tiny:", "unknown tiny family ''"),
    ("tiny:nope", "unknown tiny family 'nope'"),
])
def test_app_args_refuse_a_model_no_replica_can_open(model, message):
    """Serve's build (resolve_args) refuses, naming `model`, what every replica would fail to open."""
    from elasticmoe.app import resolve_args

    with pytest.raises(ValueError, match="model") as e:
        resolve_args({"model": model})
    assert message in str(e.value)
    if not model:
        with pytest.raises(ValueError, match="model"):
            AppArgs(model=model)


@pytest.mark.parametrize("args, field", [
    ({"shard_resources": {"resources": {"elasticmoe_x": float("nan")}}}, "shard_resources.resources"),
    ({"gateway_resources": {"num_cpus": float("inf")}}, "gateway_resources.num_cpus"),
    ({"limits": {"expert_timeout_s": float("inf")}}, "limits.expert_timeout_s"),
    ({"autoscaling": {"rebalance_interval_s": float("inf")}}, "autoscaling.rebalance_interval_s"),
    ({"autoscaling": {"scale_cooldown_s": float("nan")}}, "autoscaling.scale_cooldown_s"),
])
def test_app_args_refuse_nan_and_infinity(args, field):
    """YAML's .nan / .inf passed the range checks (nan < 0 is false; inf > 0) and reached Ray and gRPC."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(field)):
        AppArgs.model_validate({"model": "m", **args})


@pytest.mark.parametrize("section, field", [
    ("limits", "expert_timeout_s"), ("limits", "failover_s"), ("autoscaling", "rebalance_interval_s"),
    ("autoscaling", "start_deadline_s"), ("autoscaling", "scale_cooldown_s")])
def test_app_args_refuse_a_wait_past_a_day(section, field):
    """A wait of 1e10 s (meant as 'never') passed the checks, and past threading.TIMEOUT_MAX (about 9.2e9 s) a
    thread waiting on it dies with OverflowError (the gateway's deadline thread among them); a day is the most, and
    a day is taken."""
    from pydantic import ValidationError

    from elasticmoe.config import MAX_WAIT_S

    assert MAX_WAIT_S == 86400.0 and threading.TIMEOUT_MAX > 1e9
    with pytest.raises(OverflowError):
        threading.Event().wait(1e10)
    with pytest.raises(ValidationError, match=re.escape(f"{section}.{field}")):
        AppArgs.model_validate({"model": "m", section: {field: 1e10}})
    assert getattr(getattr(AppArgs.model_validate({"model": "m", section: {field: MAX_WAIT_S}}), section),
                   field) == MAX_WAIT_S


def test_the_scale_cool_down_is_an_autoscaling_setting():
    """autoscaling.scale_cooldown_s: 30 s unless set, 0 allowed (decide every stats round), a negative value or a
    misspelt key refused naming it (tests/test_controller_loads.py: the controller's decisions follow it)."""
    from pydantic import ValidationError

    auto = lambda **kw: AppArgs.model_validate({"model": "m", "autoscaling": kw}).autoscaling  # noqa: E731
    assert auto().scale_cooldown_s == 30.0 and auto(scale_cooldown_s=0).scale_cooldown_s == 0.0
    assert auto(scale_cooldown_s=300).scale_cooldown_s == 300.0
    for bad, field in (({"scale_cooldown_s": -1}, "autoscaling.scale_cooldown_s"),
                       ({"scale_cooldown_s": "soon"}, "autoscaling.scale_cooldown_s"),
                       ({"cooldown_s": 10}, "autoscaling.cooldown_s")):
        with pytest.raises(ValidationError, match=re.escape(field)):
            auto(**bad)


def test_request_ids_with_control_characters_are_refused():
    """A request id is written to the gateway's log: a newline or other control character in it would let a client
    forge log lines, so it is refused naming request_id; printable Unicode passes."""
    v = Validator(vocab_size=100, max_model_len=32)
    for rid in ["a\nERROR forged", "a\rb", "tab\there", "nul\x00", "esc\x1b[31m", "del\x7f", "line\u2028sep"]:
        with pytest.raises(InvalidRequest) as e:
            v.request_id(rid)
        assert e.value.field == "request_id" and "control" in str(e.value), (rid, e.value)
    assert v.request_id("req-42 übung 例") == "req-42 übung 例"


@pytest.mark.parametrize("name", ["a\nmodel", "m\r", "tab\there", "nul\x00", "esc\x1b[31m", "del\x7f",
                                  "c1\x85", "line\u2028sep", "rtl\u202eoverride"])
def test_a_served_model_name_with_control_characters_is_refused_naming_it(name):
    """served_model_name is echoed in every response's `model`, /v1/models and the logs: a newline or an escape
    there forges lines (and labels); it is refused naming the field. OpenAI-style names stay valid."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="served_model_name: control characters"):
        AppArgs(model="m", served_model_name=name)
    for ok in ["org/model:tag", "ft:gpt-4o-mini:my-org::abc123", "Qwen/Qwen1.5-MoE-A2.7B", "my model v1.0", "模型"]:
        assert AppArgs(model="m", served_model_name=ok).served_model_name == ok


@pytest.mark.parametrize("dirname", ["a\nmodel", "esc\x1b[31m", "rtl\u202eoverride"])
def test_a_default_served_model_name_with_control_characters_is_refused(tmp_path, dirname):
    """With served_model_name unset, Serve's build (resolve_args) names the model after its directory: a name with
    a newline or an escape went in unchecked (model_copy skips validation), to be echoed in every response, and
    each replica, validating the args again, failed to start. The build now refuses it naming served_model_name
    and model; a served_model_name given serves that directory, and a plain directory's name is still taken."""
    from elasticmoe.app import resolve_args

    (tmp_path / dirname).mkdir()
    (tmp_path / dirname / "config.json").write_text("{}")  # a checkpoint directory (resolve wants its config)
    with pytest.raises(ValueError, match="served_model_name") as e:
        resolve_args({"model": str(tmp_path / dirname)})
    assert "control characters" in str(e.value) and "model" in str(e.value).replace("served_model_name", "")
    assert resolve_args({"model": str(tmp_path / dirname), "served_model_name": "mine"}).served_model_name == "mine"
    (tmp_path / "plain-model").mkdir()
    (tmp_path / "plain-model" / "config.json").write_text("{}")
    a = resolve_args({"model": str(tmp_path / "plain-model")})
    assert a.served_model_name == "plain-model"
    assert AppArgs.model_validate(a.model_dump(mode="json", exclude_unset=True)) == a  # as each replica reads it


def test_the_default_max_tokens_is_cut_to_the_context_left():
    """Validator.default_max_tokens: the one rule every door (HTTP completions and chat, gRPC, LLM.generate)
    applies to an unset max_tokens: the door's default, cut to what the prompt leaves, never below 1."""
    v = Validator(50, 128)
    assert [v.default_max_tokens(n, 16) for n in (1, 112, 120, 127)] == [16, 16, 8, 1]
    assert v.default_max_tokens(100, 128) == 28 and v.default_max_tokens(100, 6) == 6


@pytest.mark.parametrize("kw,field", [
    ({"stop": ["a", None]}, "stop"), ({"prompt_token_ids": [1, "2"]}, "prompt_token_ids"),
    ({"prompt_token_ids": [2**40]}, "prompt_token_ids"), ({"request_id": 5}, "request_id"),
    ({"prompt": 5}, "prompt"), ({"max_tokens": 2**31}, "max_tokens"),
])
def test_the_python_client_names_the_field_protobuf_refuses(kw, field):
    """make_request named the sampling field whose value protobuf refused, but not the others: stop=["a", None]
    raised TypeError "bad argument type for built-in operation", a token id past int32 ValueError "Value out of
    range: 1099511627776", with no field named. Each is now a ValueError starting with its field."""
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        make_request(**{"prompt": "hi", **kw})
