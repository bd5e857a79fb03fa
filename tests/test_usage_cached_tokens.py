"""Prefix-cache hits in each request's usage: a prompt sent twice reports 0 cached tokens, then the positions it took
from the cache (its full blocks but the last token's), over HTTP (completions, chat, streamed usage, read by the real
openai client), gRPC (Generate and GenerateStream) and offline (RequestOutput.num_cached_tokens); 0 with
limits.prefix_caching off. A tiny Mixtral, real engine and real servers."""

from __future__ import annotations

import grpc
import pytest
from openai import OpenAI

from elasticmoe import LLM, SamplingParams
from elasticmoe.client import make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.gateway.openai_api import build_openai_app
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc
from tests.openai_util import MODEL, Core, Server, model  # noqa: F401 - the module-scoped tiny model fixture

BLOCK = 16  # the engine's kv_block_size (its default)
LONG = ("The quick brown fox jumps over the lazy dog while the experts of a mixture route each token to the few "
        "that know it best, and the gateway batches the requests of many users into one step. ")


def _prompt(tag: str) -> str:
    """A prompt of several KV blocks whose first tokens are its own (no other test's cached blocks match it)."""
    return f"{tag}: {LONG}"


def _hits(prompt_tokens: int) -> int:
    """What a prompt's repeat takes from the cache: its full blocks, the last token left to run."""
    return (prompt_tokens - 1) // BLOCK * BLOCK


def _serve(model, **limits):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128, **limits)
    server = Server(build_openai_app(core))
    return core, server, OpenAI(base_url=server.url, api_key="none", max_retries=0)


@pytest.fixture(scope="module", params=[True, False], ids=["caching", "no_caching"])
def served(model, request):  # noqa: F811
    """(prefix caching on, openai client) of a real HTTP app."""
    core, server, client = _serve(model, prefix_caching=request.param)
    assert core.runner.engine.prefix_caching is request.param
    yield request.param, client
    server.stop()
    core.runner.close()


def _twice(call) -> list:
    """The usage of `call()` run twice, one after the other."""
    return [call().usage for _ in range(2)]


def _check(usages: list, caching: bool) -> None:
    first, second = usages
    assert first.prompt_tokens == second.prompt_tokens > 3 * BLOCK
    assert first.prompt_tokens_details.cached_tokens == 0
    want = _hits(second.prompt_tokens) if caching else 0
    assert second.prompt_tokens_details.cached_tokens == want
    assert second.total_tokens == second.prompt_tokens + second.completion_tokens


def test_completions_report_the_cached_prompt_tokens(served):
    caching, client = served
    prompt = _prompt(f"completions {caching}")
    _check(_twice(lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0)),
           caching)


def test_chat_reports_the_cached_prompt_tokens(served):
    caching, client = served
    messages = [{"role": "user", "content": _prompt(f"chat {caching}")}]
    _check(_twice(lambda: client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)), caching)


def _streamed_usage(stream) -> object:
    """The usage chunk of a stream with include_usage: the last, with no choices (the others carry none)."""
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    return chunks[-1]


def test_streamed_usage_reports_the_cached_prompt_tokens(served):
    caching, client = served
    opts = {"include_usage": True}
    prompt = _prompt(f"stream {caching}")
    _check(_twice(lambda: _streamed_usage(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, stream=True, stream_options=opts))), caching)
    messages = [{"role": "user", "content": _prompt(f"chat stream {caching}")}]
    _check(_twice(lambda: _streamed_usage(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, stream=True, stream_options=opts))), caching)


def test_a_shared_prefix_with_another_ending_takes_its_whole_blocks(served):
    """A second prompt that starts as the first and ends otherwise: the full blocks of the common start."""
    caching, client = served
    prompt = _prompt(f"shared {caching}")
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0.0).usage
    other = client.completions.create(model=MODEL, prompt=prompt + "Another ending entirely.", max_tokens=2,
                                      temperature=0.0).usage
    assert first.prompt_tokens_details.cached_tokens == 0 and other.prompt_tokens > first.prompt_tokens
    want = (first.prompt_tokens - 1) // BLOCK * BLOCK if caching else 0  # the common start: the first prompt but
    assert other.prompt_tokens_details.cached_tokens == want  # (at most) its last token, which the ending may change


@pytest.fixture(scope="module")
def stub(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    core.api_keys = ApiKeys()
    port = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=16)
    channel = grpc.insecure_channel(port.address)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()
    port.stop(0)
    core.runner.close()


def test_grpc_usage_carries_the_cached_prompt_tokens(stub):
    """Generate, then GenerateStream (every message's usage: the cached count is known from the first)."""
    req = make_request(_prompt("grpc"), max_tokens=4, temperature=0.0)
    first = stub.Generate(req, timeout=60).usage
    chunks = list(stub.GenerateStream(req, timeout=60))
    assert first.cached_tokens == 0 and first.prompt_tokens > 3 * BLOCK
    assert {c.usage.cached_tokens for c in chunks} == {_hits(first.prompt_tokens)}
    again = stub.Generate(req, timeout=60).usage
    assert again.cached_tokens == _hits(first.prompt_tokens) and again.prompt_tokens == first.prompt_tokens


def _old_usage():
    """Usage as generation.proto had it before cached_tokens (fields 1 and 2): an older client's class."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="old_generation.proto", package="old", syntax="proto3")
    msg = proto.message_type.add(name="Usage")
    for number, name in ((1, "prompt_tokens"), (2, "completion_tokens")):
        msg.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("old.Usage"))


def test_old_and_new_usage_read_each_other():
    """Usage.cached_tokens is a new field (3): a client built before it reads the counts it knows, and an old
    server's answer reads as 0 cached."""
    old_usage = _old_usage()
    old = old_usage.FromString(gen.Usage(prompt_tokens=70, completion_tokens=4, cached_tokens=64).SerializeToString())
    assert (old.prompt_tokens, old.completion_tokens) == (70, 4)
    new = gen.Usage.FromString(old_usage(prompt_tokens=70, completion_tokens=4).SerializeToString())
    assert (new.prompt_tokens, new.completion_tokens, new.cached_tokens) == (70, 4, 0)


@pytest.mark.parametrize("caching", [True, False])
def test_offline_outputs_carry_the_cached_prompt_tokens(model, caching):  # noqa: F811
    llm = LLM(model[0], prefix_caching=caching)
    ids = llm.encode(_prompt("offline"))
    params = SamplingParams(max_tokens=3, temperature=0.0)
    first, second = (llm.generate([ids], params)[0] for _ in range(2))
    assert first.num_cached_tokens == 0 and len(ids) > 3 * BLOCK
    assert second.num_cached_tokens == (_hits(len(ids)) if caching else 0)
    assert second.token_ids == first.token_ids
