"""Tests of elasticmoe.rpc: tensor codec, raised gRPC message limits, generated code freshness."""

from __future__ import annotations

import asyncio
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
from elasticmoe.rpc import generate
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
