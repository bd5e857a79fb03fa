"""The direct_grpc port checks the API key before it reads a request (a real grpc.aio server over a real engine, no
Ray): calls without a valid key that never send their request message end UNAUTHENTICATED at once and hold none of
the port's places, so a client with a key is still served."""

from __future__ import annotations

import threading

import grpc
import pytest

from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.rpc import generation_pb2 as gen
from elasticmoe.rpc import generation_pb2_grpc as gen_grpc
from tests.test_api_keys import KEY, core, path  # noqa: F401

PLACES = 4  # the port's maximum_concurrent_rpcs


def _raw(x: bytes) -> bytes:
    return x


@pytest.fixture
def ingress(core):  # noqa: F811
    server = DirectIngress(GenerationService(core), "127.0.0.1", 0, max_rpcs=PLACES)
    yield server
    server.stop(0)


def test_calls_without_a_key_that_never_send_their_request_hold_no_place(ingress, core):  # noqa: F811
    """Before: the key was checked in the handler, which gRPC runs once the request message is in; 4 keyless calls
    that sent none held the port's 4 places for as long as they liked, and a keyed call got RESOURCE_EXHAUSTED."""
    never = threading.Event()

    def no_message():  # the request stream: headers go out, a message never does
        never.wait()
        yield b""

    before = core.metrics.requests.get(("grpc", "unauthenticated"), 0)
    with grpc.insecure_channel(ingress.address) as ch:
        unary = ch.stream_unary("/elasticmoe.v1.Generation/Generate", _raw, _raw)
        streaming = ch.stream_stream("/elasticmoe.v1.Generation/GenerateStream", _raw, _raw)
        wrong = (("authorization", "Bearer sk-wrong-wrong-wrong"),)
        stalled = [unary.future(no_message()), unary.future(no_message(), metadata=wrong),
                   streaming(no_message()), streaming(no_message(), metadata=wrong)]
        try:
            stub = gen_grpc.GenerationStub(ch)
            r = stub.Generate(gen.GenerateRequest(prompt="Hello", sampling=gen.SamplingParams(max_tokens=2)),
                              metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)
            assert r.usage.completion_tokens == 2
            for call in stalled:  # each ended by the server, without its message
                with pytest.raises(grpc.RpcError) as e:
                    call.result(timeout=30) if isinstance(call, grpc.Future) else next(call)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
                assert KEY not in (e.value.details() or "")
        finally:
            never.set()
            for call in stalled:
                call.cancel()
    assert core.metrics.requests[("grpc", "unauthenticated")] - before == len(stalled)
