"""Tests of elasticmoe.rpc: tensor codec, stream frames, raised gRPC message limits, generated code freshness."""

from __future__ import annotations

import array
import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from elasticmoe.rpc import channel_options, decode_tensor, encode_tensor, server_options
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import frames, generate
from elasticmoe.rpc.frame_types import as_tensor
from elasticmoe.rpc import generation_pb2 as gen

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return (torch.randn(shape) * 100).to(dtype)
    return torch.randint(torch.iinfo(dtype).min, torch.iinfo(dtype).max, shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 4096), (3, 5, 7), (1,), (), (0,), (0, 4096), (5, 0, 3)], ids=str)
def test_codec_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(shape, dtype)
    msg = encode_tensor(t)
    assert msg.dtype == str(dtype).removeprefix("torch.")
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    wire = pb.Tensor.FromString(msg.SerializeToString())
    back = decode_tensor(wire)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_codec_non_contiguous(dtype: torch.dtype) -> None:
    base = _sample((8, 6, 4), dtype)
    for t in (base.transpose(0, 2), base[:, ::2, 1:3], base.expand(2, 8, 6, 4), base[..., 1]):
        assert not t.is_contiguous()
        back = decode_tensor(encode_tensor(t))
        assert back.is_contiguous() and back.shape == t.shape
        assert torch.equal(back, t)


def test_codec_bfloat16_bits_exact() -> None:
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # every bf16 bit pattern
    t = bits.view(torch.bfloat16)
    back = decode_tensor(encode_tensor(t))
    assert torch.equal(back.view(torch.int16), bits)


def test_codec_copy_and_out() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    req = pb.RunExpertsRequest()
    assert encode_tensor(t, out=req.hidden) is not None and req.HasField("hidden")
    view = decode_tensor(req.hidden)
    owned = decode_tensor(req.hidden, copy=True)
    owned += 1  # writable and independent of the message
    assert torch.equal(view, t) and torch.equal(owned, t + 1)
    assert torch.equal(decode_tensor(req.hidden), t)
    encode_tensor(torch.zeros(2, dtype=torch.int64), out=req.hidden)  # refill: shape replaced, not appended
    assert list(req.hidden.shape) == [2] and req.hidden.dtype == "int64"


def test_codec_errors_name_the_field() -> None:
    msg = encode_tensor(torch.ones(4, 8, dtype=torch.bfloat16))
    bad_dtype = pb.Tensor(data=msg.data, dtype="bf16", shape=msg.shape)
    with pytest.raises(ValueError, match=r"RunExpertsRequest\.hidden\.dtype.*'bf16'"):
        decode_tensor(bad_dtype, "RunExpertsRequest.hidden")
    truncated = pb.Tensor(data=msg.data[:-1], dtype="bfloat16", shape=msg.shape)
    with pytest.raises(ValueError, match=r"RunExpertsRequest\.hidden\.data: 63 bytes, expected 64"):
        decode_tensor(truncated, "RunExpertsRequest.hidden")
    too_long = pb.Tensor(data=msg.data + b"\0\0", dtype="bfloat16", shape=msg.shape)
    with pytest.raises(ValueError, match=r"topk_ids\.data"):
        decode_tensor(too_long, "topk_ids")
    with pytest.raises(ValueError, match=r"tensor\.shape: negative"):
        decode_tensor(pb.Tensor(data=b"", dtype="float32", shape=[-1, 0]))
    with pytest.raises(ValueError, match="complex64"):
        encode_tensor(torch.zeros(2, dtype=torch.complex64))


FRAME_DTYPES = [*DTYPES, torch.float64, torch.int16, torch.int8, torch.uint8, torch.bool]


def _frame_sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.rand(shape) > 0.5 if dtype == torch.bool else _sample(shape, dtype)


@pytest.mark.parametrize("dtype", FRAME_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (0, 7), (3, 0), (4,), ()], ids=str)
def test_frame_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _frame_sample(shape, dtype)
    ids, weights = torch.randint(-1, 9, (3, 2), dtype=torch.int32), torch.rand(3, 2)
    wire = frames.encode_request(11, 4, t, ids, weights, placement_version=-2, step=1 << 40)
    tensor_bytes = sum(-(-x.numel() * x.element_size() // 8) * 8 for x in (t, ids, weights))
    assert len(wire) == 8 + frames.HEADER.size + 3 * frames.DESC.size + tensor_bytes  # raw: no per-value overhead
    req = frames.decode_request(wire)
    assert (req.id, req.layer, req.placement_version, req.step) == (11, 4, -2, 1 << 40)
    back = decode_tensor(req.hidden, "hidden")
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    assert torch.equal(decode_tensor(req.topk_ids), ids) and torch.equal(decode_tensor(req.topk_weights), weights)
    reply = frames.decode_reply(frames.encode_reply(11, t, [5, 2], compute_us=77, placement_version=3))
    assert (reply.id, reply.code, reply.missing, reply.compute_us, reply.placement_version) == (11, 0, [5, 2], 77, 3)
    assert torch.equal(decode_tensor(reply.output), t) and decode_tensor(reply.output).dtype == dtype
    assert pb.ExpertFrame.FromString(wire).frame == wire[8:]  # a plain protobuf message on the wire
    for got in (as_tensor(req.hidden), as_tensor(reply.output), as_tensor(encode_tensor(t))):  # the hot path's reader
        assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t), (got.dtype, got.shape)


def test_frame_bfloat16_bits_and_alignment() -> None:
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).reshape(256, 256)
    hidden = bits.view(torch.bfloat16)  # every bf16 bit pattern, 2 bytes each on the wire
    ids, weights = torch.zeros(256, 1, dtype=torch.int32), torch.ones(256, 1)
    wire = frames.encode_request(1, 0, hidden, ids, weights)
    req = frames.decode_request(wire)
    assert req.hidden.data.nbytes == 2 * hidden.numel()
    assert torch.equal(decode_tensor(req.hidden).view(torch.int16), bits)
    offsets = [wire.index(bytes(m)[:64]) for m in (req.topk_ids.data, req.topk_weights.data)]
    assert all(o % 8 == 0 for o in offsets)  # each tensor starts 8-aligned in the message
    via_proto = frames.request_frame(1, frames.ExpertRequest(0, hidden, ids, weights).to_proto())
    assert via_proto == wire  # a RunExpertsRequest message frames to the same bytes as its tensors
    other_writer = pb.ExpertFrame(frame=wire[8:]).SerializeToString()  # minimal varint, no align field
    again = decode_tensor(frames.decode_request(other_writer).hidden)
    assert other_writer != wire and torch.equal(again.view(torch.int16), bits)


def _payload(wire: bytes) -> bytearray:
    return bytearray(wire[8:])


def _rewire(payload: bytearray) -> bytes:
    return pb.ExpertFrame(frame=bytes(payload)).SerializeToString()


def test_frame_errors_are_clear() -> None:
    good = frames.encode_request(9, 1, torch.ones(2, 4), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1))
    desc = frames.HEADER.size
    cases = {"not an ExpertFrame": b"\xffgarbage", "shorter than the 40-byte header": _rewire(_payload(good)[:20])}
    p = _payload(good)
    p[:4] = b"NOPE"
    cases["magic b'NOPE'"] = _rewire(p)
    cases["tensor 2 [2, 1] float32 needs 8 bytes"] = _rewire(_payload(good)[:-8])
    cases["its header describes"] = _rewire(_payload(good) + b"\0" * 8)
    for offset, value, what in ((desc, 42, "dtype code 42"), (desc + 1, 3, "ndim 3")):
        p = _payload(good)
        p[offset] = value
        cases[what] = _rewire(p)
    p = _payload(good)
    p[desc + 8:desc + 16] = (-1).to_bytes(8, "little", signed=True)
    cases["dims [-1, 4]"] = _rewire(p)
    p = _payload(good)
    p[20:24] = (1 << 31).to_bytes(4, "little")  # the header's error text length, past the frame's end
    cases["too short for its 2147483648-byte error text"] = _rewire(p)
    for what, wire in cases.items():
        with pytest.raises(frames.FrameError, match=re.escape(what)):
            frames.decode_request(wire)
        assert isinstance(frames.decode_request_or_error(wire), frames.FrameError)
    with pytest.raises(frames.FrameError) as e:
        frames.decode_request(cases["tensor 2 [2, 1] float32 needs 8 bytes"])
    assert e.value.frame_id == 9  # a readable header names its frame
    with pytest.raises(frames.FrameError, match="kind 2"):
        frames.decode_request(frames.encode_reply(3, torch.ones(1, 1)))  # a reply is not a request
    failed = frames.decode_reply(frames.encode_reply(3, code=3, error="layer: 999 is not an MoE layer"))
    assert (failed.code, failed.error, failed.output) == (3, "layer: 999 is not an MoE layer", None)
    with pytest.raises(ValueError, match="complex64"):
        frames.encode_request(1, 0, torch.zeros(2, 2, dtype=torch.complex64), torch.zeros(2, 1), torch.zeros(2, 1))


def test_reply_missing_must_be_one_dimensional() -> None:
    """An OK reply whose `missing` is not [m] int32 (0 or 2 dims) is a FrameError, not an IndexError."""
    for shape, values in (((), [5]), ((1, 2), [5, 6])):
        ids = array.array("i", values)
        missing = frames.WireTensor(memoryview(ids).cast("B"), "int32", shape)
        wire = frames._frame(frames.REPLY, 4, 0, b"", 0, 0, [torch.ones(1, 2), missing])
        with pytest.raises(frames.FrameError, match=re.escape("int32 missing [m]")) as e:
            frames.decode_reply(wire)
        assert e.value.frame_id == 4


def test_frames_over_the_message_limit_are_refused_before_sending() -> None:
    """At DeepSeek-V3's width (H = 7168, top-8, bf16) max_rows is the most tokens whose float64 reply and bf16
    request each fit the 256 MiB message limit; one more makes a reply the receiver would refuse, ending the whole
    connection: the frame is refused here instead, naming the limit (tensors allocated, never touched)."""
    h, k = 7168, 8
    most = frames.max_rows(h, k, torch.bfloat16.itemsize, torch.float64.itemsize)
    assert most == 4681 and frames.max_rows(h, k, 2, 8, limit=1 << 20) == 18
    for rows in (most, most + 1):
        out = torch.empty(rows, h, dtype=torch.float64)  # [T, H]
        ids = torch.zeros(rows, k, dtype=torch.int32)
        req = frames.ExpertRequest(3, torch.empty(rows, h, dtype=torch.bfloat16), ids, ids.float())
        if rows == most:
            assert sum(map(len, frames.reply_parts(1, out))) <= frames.MAX_MESSAGE_BYTES
            assert sum(map(len, frames.request_parts(1, req))) <= frames.MAX_MESSAGE_BYTES
            continue
        with pytest.raises(ValueError, match=r"more than the \d+-byte message limit \(ELASTICMOE_GRPC_MAX_MESSAGE"):
            frames.reply_parts(1, out)
    wide = torch.empty(frames.MAX_MESSAGE_BYTES // (2 * h) + 1, h, dtype=torch.bfloat16)  # the request alone over it
    ids = torch.zeros(wide.shape[0], 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="message limit"):
        frames.request_parts(2, frames.ExpertRequest(3, wide, ids, ids.float()))


class _Doubler(pb_grpc.ExpertShardServicer):
    """Returns 2 * hidden, so the test sees the server really decoded and re-encoded it."""

    async def RunExperts(self, request: pb.RunExpertsRequest, context) -> pb.RunExpertsResponse:
        hidden = decode_tensor(request.hidden, "RunExpertsRequest.hidden")
        response = pb.RunExpertsResponse(placement_version=request.placement_version, missing=[7])
        encode_tensor(hidden * 2, out=response.output)
        return response

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return pb.HealthResponse(ok=True, shard_id="test", placement_version=3)


async def _big_round_trip(t: torch.Tensor) -> tuple[torch.Tensor, pb.HealthResponse, grpc.StatusCode]:
    server = grpc.aio.server(options=server_options())
    pb_grpc.add_ExpertShardServicer_to_server(_Doubler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        request = pb.RunExpertsRequest(layer=1, placement_version=3, step=9)
        encode_tensor(t, out=request.hidden)
        async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
            stub = pb_grpc.ExpertShardStub(channel)
            response = await stub.RunExperts(request, timeout=30)
            assert list(response.missing) == [7] and response.placement_version == 3
            out = decode_tensor(response.output, "RunExpertsResponse.output", copy=True)
            health = await stub.Health(pb.HealthRequest(), timeout=5)
        async with grpc.aio.insecure_channel(target) as default_channel:  # 4 MiB receive limit
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ExpertShardStub(default_channel).RunExperts(request, timeout=30)
        return out, health, err.value.code()
    finally:
        await server.stop(grace=None)


def test_grpc_aio_large_tensor_both_ways() -> None:
    t = torch.randn(640, 4096).to(torch.bfloat16)  # 5 MiB each way, over gRPC's 4 MiB default
    assert t.numel() * t.element_size() > 4 * 1024 * 1024
    out, health, default_code = asyncio.run(_big_round_trip(t))
    assert torch.equal(out, t * 2)
    assert health.ok and health.shard_id == "test" and health.placement_version == 3
    assert default_code == grpc.StatusCode.RESOURCE_EXHAUSTED  # the raised limits are what made it work


def test_generation_api_contract() -> None:
    from elasticmoe.rpc.generation_pb2_grpc import GenerationStub, add_GenerationServicer_to_server

    assert callable(add_GenerationServicer_to_server) and callable(GenerationStub)
    sampling = gen.SamplingParams(temperature=0.0, stop=["\n"])
    assert sampling.HasField("temperature") and not sampling.HasField("max_tokens")
    assert not sampling.HasField("seed") and not sampling.HasField("logprobs")
    req = gen.GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3], sampling=sampling)
    assert not req.HasField("prompt") and list(req.prompt_token_ids) == [1, 2, 3]
    assert [gen.FinishReason.Name(v) for v in range(5)] == [
        "FINISH_REASON_UNSPECIFIED", "LENGTH", "STOP", "EOS", "ABORT"]
    resp = gen.GenerateResponse(request_id="r1", text="hi", token_ids=[5], finish_reason=gen.EOS,
                                usage=gen.Usage(prompt_tokens=3, completion_tokens=1),
                                logprobs=[gen.TokenLogprob(token_id=5, logprob=-0.5,
                                                           top=[gen.TopLogprob(token_id=5, logprob=-0.5)])])
    assert gen.GenerateResponse.FromString(resp.SerializeToString()) == resp


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run([sys.executable, "-m", "elasticmoe.rpc.generate", "--check"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


def test_check_reports_stale_missing_and_orphans(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")
    pkg = tmp_path / "elasticmoe" / "rpc"
    generate.generate(tmp_path)
    assert generate.check(tmp_path) == []
    (pkg / "experts_pb2.py").write_text("# stale\n")
    (pkg / "generation_pb2.pyi").unlink()
    (pkg / "removed_pb2_grpc.py").write_text("# orphan\n")
    problems = generate.check(tmp_path)
    assert any(p.startswith("elasticmoe/rpc/experts_pb2.py: stale") for p in problems), problems
    assert any(p.startswith("elasticmoe/rpc/generation_pb2.pyi: missing") for p in problems), problems
    assert any(p.startswith("elasticmoe/rpc/removed_pb2_grpc.py: orphan") for p in problems), problems
    assert len(problems) == 3
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1


def test_serve_proxy_maps_a_dead_replica_to_unavailable():
    """The servicer hook Serve's proxy calls: a replica that died mid-request is UNAVAILABLE / 503 (retry), while
    a request's own errors keep Serve's mapping (INTERNAL / 500 for an unexpected one)."""
    import grpc
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve._private import proxy

    from elasticmoe.rpc.serve_proxy import REPLICA_DIED, add_generation_servicer, install_replica_death_mapping

    from elasticmoe.rpc.generation_pb2_grpc import GenerationServicer

    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    add_generation_servicer(GenerationServicer(), server)  # registers Generation and installs the mapping
    assert install_replica_death_mapping()  # idempotent
    for died in (ActorDiedError(), ActorUnavailableError("replica unreachable", None)):
        st = proxy.get_grpc_response_status(died, None, "r1")
        assert (st.code, st.is_error, st.message) == (grpc.StatusCode.UNAVAILABLE, True, REPLICA_DIED)
        assert proxy.get_http_response_status(died, None, "r1").code == 503
    other = RuntimeError("boom")
    assert proxy.get_grpc_response_status(other, None, "r2").code == grpc.StatusCode.INTERNAL
    assert proxy.get_http_response_status(other, None, "r2").code == 500
    assert proxy.get_grpc_response_status(TimeoutError(), 3.0, "r3").code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.stop(None)


class _Context:
    """The part of a grpc ServicerContext that Serve's status setter uses."""

    def __init__(self, code=None, details=None):
        self._code, self._details, self.trailing = code, details, None

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def set_trailing_metadata(self, md):
        self.trailing = md


def test_serve_proxy_refusals_carry_retry_after():
    """Serve drops a failed call's trailing metadata; our hook puts retry-after on every RESOURCE_EXHAUSTED, the
    gateway's own (code set by the replica) or Serve's backpressure, and on nothing else."""
    import grpc
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    from elasticmoe.rpc.serve_proxy import install_replica_death_mapping

    assert install_replica_death_mapping()
    ours = _Context(grpc.StatusCode.RESOURCE_EXHAUSTED, "the gateway is at capacity")
    proxy.set_grpc_code_and_details(ours, ResponseStatus(code=grpc.StatusCode.RESOURCE_EXHAUSTED, is_error=True))
    assert ours.trailing == [("retry-after", "1")] and ours.details() == "the gateway is at capacity"
    serves = _Context()
    proxy.set_grpc_code_and_details(serves, ResponseStatus(code=grpc.StatusCode.RESOURCE_EXHAUSTED, is_error=True,
                                                           message="queue full"))
    assert serves.trailing == [("retry-after", "1")] and serves.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = _Context()
    proxy.set_grpc_code_and_details(other, ResponseStatus(code=grpc.StatusCode.INVALID_ARGUMENT, is_error=True))
    assert other.trailing is None
