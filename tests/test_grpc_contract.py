"""generation.proto as a client in another language reads it: raw request bytes (what any protobuf library may send)
to a real grpc.aio server (the direct port, the handlers Serve's proxy calls too) over a real engine. A request
protobuf cannot parse, a field out of range: INVALID_ARGUMENT naming the field; a stream's messages joined are the
unary answer, the last one carrying finish_reason and the final usage."""

from __future__ import annotations

import grpc
import pytest

from elasticmoe.client import make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService, GenerationServicer
from elasticmoe.rpc import generation_pb2 as gen
from tests.openai_util import PROMPT, Core, model  # noqa: F401 - the module-scoped tiny model fixture


class Raw:
    """Generate / GenerateStream of a real port, sending bytes as they are (no client-side protobuf checks)."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        parse = gen.GenerateResponse.FromString
        self.unary = self.channel.unary_unary("/elasticmoe.v1.Generation/Generate", response_deserializer=parse)
        self.stream = self.channel.unary_stream("/elasticmoe.v1.Generation/GenerateStream",
                                                response_deserializer=parse)

    def both(self, data: bytes) -> list:
        """(code, details) of Generate and of GenerateStream for `data`, or their answers."""
        out = []
        for call in (lambda: self.unary(data, timeout=60), lambda: list(self.stream(data, timeout=60))):
            try:
                out.append(call())
            except grpc.RpcError as e:
                out.append((e.code(), e.details()))
        return out


@pytest.fixture(scope="module")
def port(model):  # noqa: F811
    core = Core(*model, max_num_seqs=4, max_model_len=128)
    core.api_keys = ApiKeys()
    port = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=16)
    raw = Raw(port.address)
    yield core, raw
    raw.channel.close()
    port.stop(0)
    core.runner.close()


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (payloads under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


SAMPLING = gen.SamplingParams(max_tokens=2).SerializeToString()


@pytest.mark.parametrize("data,field", [
    (_field(2, b"ab\xff"), "prompt"),  # prompt
    (_field(1, b"id\xc3") + _field(2, b"hi"), "request_id"),
    (_field(2, b"hi") + _field(4, SAMPLING + _field(6, b"\xed\xa0\x80")), "stop"),  # a surrogate, as CESU-8 has it
    (_field(2, b"hi") + _field(4, _field(6, b"ok") + _field(6, b"\x80")), "stop[1]"),
    (b"\xff\xff\xff", "request"),  # not protobuf at all
])
def test_a_request_protobuf_cannot_parse_is_invalid_argument_naming_the_field(port, data, field):
    """proto3 strings must be UTF-8; clients in C++, JavaScript and others send what they are given. Such a request
    was answered UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: Error parsing message ...",
    naming no field and counted nowhere; it is now INVALID_ARGUMENT naming the field, as any bad value is, on both
    methods, counted as invalid, and the port keeps serving."""
    core, raw = port
    before = core.metrics.requests.get(("grpc", "invalid"), 0)
    for code, details in raw.both(data):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (code, details)
        assert "Unexpected" not in details
    assert core.metrics.requests[("grpc", "invalid")] == before + 2
    unary, chunks = raw.both(make_request(PROMPT, max_tokens=2).SerializeToString())
    assert unary.usage.completion_tokens == 2 and chunks[-1].usage.completion_tokens == 2


def test_serve_proxys_registration_reads_requests_the_same_way(model):  # noqa: F811
    """Serve's proxy registers the service with add_generation_servicer and deserializes there, handing the
    replica what it read: the same reading, so a malformed request reaches the replica's handler as one it refuses
    naming the field (here a grpc.aio server registered that way, the service's own servicer behind it)."""
    import asyncio

    from elasticmoe.rpc.serve_proxy import add_generation_servicer

    core = Core(*model, max_num_seqs=2, max_model_len=128)
    core.api_keys = ApiKeys()

    async def call() -> tuple:
        server = grpc.aio.server()
        add_generation_servicer(GenerationServicer(GenerationService(core)), server)
        bound = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{bound}") as ch:
                try:
                    await ch.unary_unary("/elasticmoe.v1.Generation/Generate")(_field(2, b"\xff"), timeout=60)
                except grpc.RpcError as e:
                    return e.code(), e.details()
        finally:
            await server.stop(0)

    try:
        code, details = asyncio.run(call())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompt: "), (code, details)
    finally:
        core.runner.close()


@pytest.mark.parametrize("sampling,field,says", [
    ({"max_tokens": 0}, "max_tokens", "[1, "), ({"max_tokens": 120}, "max_tokens", "context length 128"),
    ({"temperature": -0.5}, "temperature", ">= 0"), ({"temperature": 1e-40}, "temperature", "use 0 for greedy"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"), ({"top_k": -2}, "top_k", "-1 (off)"),
    ({"stop": [""]}, "stop", "non-empty"), ({"stop": ["x" * 257]}, "stop", "the limit is 256"),
    ({"stop": ["s"] * 17}, "stop", "the limit is 16"), ({"stop": ["ok", ""]}, "stop[1]", "non-empty"),
    ({"stop": ["ok", "x" * 257, "x"]}, "stop[1]", "the limit is 256"),
    ({"logprobs": 21}, "logprobs", "[0, 20], got 21"), ({"logprobs": 2**32 - 1}, "logprobs", "[0, 20], got 4294967295"),
])
def test_each_value_out_of_range_names_its_field_and_the_range_the_proto_documents(port, sampling, field, says):
    """A uint32 logprobs above int32's range was refused as "must be in [0, 2147483647]", a range the proto never
    gave (it says at most 20) and one that 21 is in; every refusal now states the range the server holds to. One of
    several stop strings empty or too long was named "stop", not "stop[i]" as the proto documents."""
    _, raw = port
    data = gen.GenerateRequest(prompt=PROMPT, sampling=gen.SamplingParams(**sampling)).SerializeToString()
    for code, details in raw.both(data):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}: "), (code, details)
        assert says in details, details


def _check_stream_is_the_unary_answer(raw: Raw, req: gen.GenerateRequest) -> gen.GenerateResponse:
    """The contract of GenerateStream against Generate for one seeded request; returns the unary answer."""
    unary, chunks = raw.both(req.SerializeToString())
    assert isinstance(chunks, list) and chunks, chunks
    *body, last = chunks
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert [lp for c in chunks for lp in c.logprobs] == list(unary.logprobs)
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert last.finish_reason == unary.finish_reason != gen.FINISH_REASON_UNSPECIFIED
    assert all(c.finish_reason == gen.FINISH_REASON_UNSPECIFIED for c in body)
    assert last.usage == unary.usage and unary.usage.completion_tokens == len(unary.token_ids)
    assert all(c.usage.prompt_tokens == unary.usage.prompt_tokens for c in chunks)
    assert {c.request_id for c in chunks} == {unary.request_id} and unary.request_id == req.request_id
    return unary


def test_a_streams_messages_joined_are_the_unary_answer_stop_strings_and_multibyte_text_included(port):
    """What generation.proto promises of GenerateStream: its texts, token ids and logprobs joined are Generate's
    answer (text held back while a token ends mid-character or may start a stop string), finish_reason on the last
    message only, usage on every one (final on the last); a stop string, here a multi-byte character the sampled
    text holds, cuts the text before it in both."""
    _, raw = port
    cut = 0
    for seed in range(8):  # until two texts with a multi-byte character were cut
        kw = dict(temperature=3.0, seed=seed, max_tokens=30, ignore_eos=True, logprobs=2)
        whole = _check_stream_is_the_unary_answer(raw, make_request(PROMPT, request_id=f"r{seed}", **kw))
        assert whole.finish_reason == gen.LENGTH and all(len(lp.top) == 2 for lp in whole.logprobs)
        wide = [ch for ch in whole.text[1:] if len(ch.encode()) > 1 and ch != "\ufffd"]
        if wide:
            stopped = _check_stream_is_the_unary_answer(raw, make_request(PROMPT, request_id="s", stop=wide[0], **kw))
            assert stopped.finish_reason == gen.STOP and stopped.text == whole.text[:whole.text.index(wide[0])]
            cut += 1
        if cut == 2:
            break
    assert cut == 2  # the tiny model's text at temperature 3 has multi-byte characters
