"""A stream survives its gateway replica's end without Ray: a direct gRPC port (DirectIngress over a real engine) is
stopped mid-stream and another replica started on the same port; GenerationClient.stream resumes the request there
(GenerateRequest.resume) and its messages join to the uninterrupted stream's, tokens, text, logprobs and usage. Resume
fields no stream could send are refused INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from elasticmoe.client import GenerationClient, make_request
from elasticmoe.gateway.auth import ApiKeys
from elasticmoe.gateway.direct_ingress import DirectIngress
from elasticmoe.gateway.generation_service import GenerationService
from elasticmoe.rpc import generation_pb2 as gen
from tests.openai_util import Core, model  # noqa: F401 - the module-scoped tiny model fixture

PROMPT = "The quick brown fox jumps over the lazy dog. Experts"
KINDS = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, seed=11, top_p=0.95)}


def _replica(path_store, number: int) -> tuple[Core, DirectIngress]:
    core = Core(*path_store, max_num_seqs=2, max_model_len=128)
    core.api_keys = ApiKeys()
    return core, DirectIngress(GenerationService(core), "127.0.0.1", number, max_rpcs=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _joined(chunks) -> tuple[list[int], str, list[tuple[int, float]], int, int]:
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
            [(x.token_id, x.logprob) for c in chunks for x in c.logprobs], chunks[-1].finish_reason,
            chunks[-1].usage.completion_tokens)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_stream_goes_on_on_another_replica_when_its_replica_stops(model, kind):  # noqa: F811
    kw = dict(max_tokens=40, ignore_eos=True, logprobs=1, **KINDS[kind])
    number = _free_port()
    core_a, port_a = _replica(model, number)
    core_a.dispatcher.delay_s = 0.02  # some 2 s of stream: the stop lands mid-way
    core_b, port_b = _replica(model, 0)  # the other replica, its engine loaded; on the port once port_a stops
    try:
        reference = list(GenerationClient(port_b.address, timeout_s=60).stream(PROMPT, **kw))
        port_b.stop(0)
        client = GenerationClient(f"127.0.0.1:{number}", timeout_s=120, resume_backoff_s=(0.2,) * 50)
        stream, chunks, ended = client.stream(PROMPT, **kw), [], threading.Event()

        def read() -> None:
            try:
                chunks.extend(stream)
            finally:
                ended.set()
        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 60
        while len(chunks) < 5:
            assert time.monotonic() < deadline and not ended.is_set(), "the stream did not start"
            time.sleep(0.01)
        port_a.stop(0)  # the replica's port ends its calls: the client's ends UNAVAILABLE
        before = len(chunks)
        assert not ended.is_set() and before < 40, "the stop did not land mid-stream"
        core_b, port_b = _replica(model, number)
        assert ended.wait(60), "the resumed stream did not end"
        assert stream.resumes >= 1 and len(chunks) > before
        got, want = _joined(chunks), _joined(reference)
        assert got[0] == want[0] and got[1] == want[1] and got[3:] == want[3:] == (gen.LENGTH, 40), (got, want)
        assert [t for t, _ in got[2]] == [t for t, _ in want[2]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got[2], want[2])) < 1e-4
        assert len({c.request_id for c in chunks}) == 1  # the resumed call kept the gateway's id
    finally:
        for core, port in ((core_a, port_a), (core_b, port_b)):
            port.stop(0)
            core.runner.close()


def test_resume_fields_no_stream_could_send_are_invalid_argument(model):  # noqa: F811
    core, port = _replica(model, 0)
    client = GenerationClient(port.address, timeout_s=60)
    try:
        kw = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
        first = list(client.stream(PROMPT, **kw))[0]
        vocab = core.runner.engine.spec.vocab_size
        cases = [("stream", list(first.token_ids), 10**6, "resume.text_chars"),
                 ("stream", [vocab], 0, "resume.token_ids[0]"),
                 ("stream", [1] * 8, 0, "resume.token_ids"),  # max_tokens of them: it had ended
                 ("stream", [1] * 128, 0, "resume.token_ids"),  # past the context
                 ("unary", list(first.token_ids), 0, "resume")]
        for how, ids, chars, field in cases:
            req = make_request(PROMPT, **kw)
            req.resume.token_ids.extend(ids)
            req.resume.text_chars = chars
            with pytest.raises(grpc.RpcError) as e:
                if how == "unary":
                    client.stub.Generate(req, timeout=30)
                else:
                    list(client.stub.GenerateStream(req, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value)
            assert e.value.details().startswith(f"{field}: "), (field, e.value.details())
    finally:
        client.close()
        port.stop(0)
        core.runner.close()
