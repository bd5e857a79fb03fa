"""Property-based fuzzing of the ExpertShard API over a real in-process gRPC shard (mTLS): random and mutated
RunExpertsRequests and raw bytes get OK or INVALID_ARGUMENT (never INTERNAL from our code), interleaved valid calls
stay exact against the single-process experts, and the shard keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc.codec import decode_tensor, encode_tensor
from tests.fuzz_util import FUZZ
from tests.grpc_shard import E, K, check_valid, inputs, request, shard, valid  # noqa: F401 - shard: the fixture

DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "uint8", "bool", "float64", "complex64", "", "nope"]

BASES: dict[int, bytes] = {}  # seed -> a well-formed request's bytes: the fuzzer's bases, built once (no answer)


def _base(seed: int) -> pb.RunExpertsRequest:
    if seed not in BASES:
        BASES[seed] = request(*inputs(SHARD, seed)).SerializeToString()
    return pb.RunExpertsRequest.FromString(BASES[seed])  # a fresh copy to mutate


tensors = st.builds(
    lambda data, dtype, shape: pb.Tensor(data=data, dtype=dtype, shape=shape),
    st.binary(max_size=512), st.sampled_from(DTYPES),
    st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=4))


@st.composite
def mutated_requests(draw):
    """A valid request with some fields replaced by random ones (layer, any of the three tensors, the version)."""
    req = _base(draw(st.integers(0, 50)))
    if draw(st.booleans()):
        req.layer = draw(st.integers(0, 2**32 - 1))
    for name in ("hidden", "topk_ids", "topk_weights"):
        if draw(st.integers(0, 3)) == 0:
            getattr(req, name).CopyFrom(draw(tensors))
    if draw(st.booleans()):  # plausible tensors with wrong contents: out-of-range ids, NaN weights, extra k
        t = draw(st.integers(0, 5))
        k = draw(st.integers(1, 4))
        ids = torch.tensor(draw(st.lists(st.integers(-5, 2 * E), min_size=t * k, max_size=t * k)), dtype=torch.int32)
        w = torch.tensor(draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=t * k,
                                       max_size=t * k)), dtype=torch.float32)
        req.topk_ids.CopyFrom(encode_tensor(ids.reshape(t, k)))
        req.topk_weights.CopyFrom(encode_tensor(w.reshape(t, k)))
    req.placement_version = draw(st.integers(0, 2**63 - 1))
    return req


SHARD: dict = {}
OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_fuzzed_run_experts_requests(shard):
    SHARD.update(shard)
    seen: dict[str, int] = {}

    @FUZZ
    @given(mutated_requests(), st.integers(0, 1000))
    def run(req, seed):
        try:
            resp = shard["stub"].RunExperts(req, timeout=30)
            out = decode_tensor(resp.output)
            assert out.shape == (req.hidden.shape[0], shard["hidden"]) and bool(torch.isfinite(out).all()) or \
                resp.missing, (out.shape, list(resp.missing))
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as e:
            assert e.code() in OK_CODES, (e.code(), e.details())
            assert e.details(), "an error names what is wrong"
            seen[e.code().name] = seen.get(e.code().name, 0) + 1
        if seed % 25 == 0:
            check_valid(shard, seed)  # neighbours stay exact

    run()
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen
    check_valid(shard, 7)


def test_fuzzed_raw_bytes(shard):
    seen: dict[str, int] = {}

    @FUZZ
    @given(st.binary(max_size=2048))
    def run(data):
        try:
            pb.RunExpertsRequest.FromString(data)
            decodable = True
        except Exception:  # noqa: BLE001 - not a protobuf at all
            decodable = False
        try:
            shard["raw"](data, timeout=30)
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as e:
            allowed = OK_CODES | ({grpc.StatusCode.INTERNAL} if not decodable else set())  # grpc's deserializer
            assert e.code() in allowed, (e.code(), e.details(), data[:40])
            seen[e.code().name] = seen.get(e.code().name, 0) + 1

    run()
    assert seen.get("INVALID_ARGUMENT", 0) > 0, seen
    check_valid(shard, 11)


def test_load_experts_out_of_range_layer_is_invalid_argument(shard):
    """LoadExperts naming a layer past the model's (or an expert past its count) is refused with INVALID_ARGUMENT
    naming it, not an internal IndexError; the shard loads nothing and keeps serving."""
    held = shard["store"].held()
    for layer, expert in ((len(shard["files"].spec.moe.sparse_layers), 0), (2**32 - 1, 0), (0, E)):
        with pytest.raises(grpc.RpcError) as e:
            shard["stub"].LoadExperts(pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=layer, expert=expert)]),
                                      timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (layer, expert, e.value.code(), e.value.details())
        assert f"({layer}, {expert})" in e.value.details()
    assert shard["store"].held() == held
    check_valid(shard, 3)
    with pytest.raises(ValueError):
        shard["store"].load([(-1, 0)])  # not Python's last layer


def test_a_wrong_dtype_is_refused_naming_the_dtypes_taken(shard):
    """float64 hidden states (or weights), or float ids: INVALID_ARGUMENT naming the dtypes a shard takes (the message
    once said float64 'must be floating point'); the shard keeps serving."""
    req, _ = valid(shard, 5)
    for field, cast in (("hidden", torch.float64), ("topk_weights", torch.float64), ("topk_ids", torch.float32)):
        bad = pb.RunExpertsRequest()
        bad.CopyFrom(req)
        getattr(bad, field).CopyFrom(encode_tensor(decode_tensor(getattr(req, field)).to(cast)))
        with pytest.raises(grpc.RpcError) as e:
            shard["stub"].RunExperts(bad, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
        assert "float32, float16 or bfloat16" in e.value.details() and "int32 or int64" in e.value.details()
        assert f"{field} {cast}".replace("torch.", "") in e.value.details(), e.value.details()
    check_valid(shard, 5)


def test_the_weight_of_a_minus_one_slot_is_ignored(shard):
    """experts.proto: "the weight of a -1 slot is ignored" (the gateway masks the slots other shards serve). A NaN or
    inf weight there is no reason to refuse the call (the whole call was INVALID_ARGUMENT 'topk_weights: must be
    finite'): the answer is the one with those slots left out, over unary RunExperts and over the frame listener; a
    non-finite weight on a slot this shard serves is still refused, naming the field."""
    from elasticmoe.gateway.socket_transport import SocketTransport
    from elasticmoe.rpc.frames import ExpertRequest

    g = torch.Generator().manual_seed(5)
    layer, t = shard["layers"][0], 6
    hidden = torch.randn(t, shard["hidden"], generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).to(torch.int32)  # [T, K]
    weights = torch.rand(t, K, generator=g)
    ids[::2, 1] = -1
    ref = LocalDispatcher(shard["store"]).dispatch(layer, hidden, ids, weights).wait()
    weights[0, 1], weights[2, 1], weights[4, 1] = float("nan"), float("inf"), float("-inf")
    req = ExpertRequest(layer, hidden, ids, weights)
    out = decode_tensor(shard["stub"].RunExperts(req.to_proto(), timeout=30).output)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-6)
    socket = SocketTransport()
    try:
        reply = socket.send(shard["address"], lambda: req, 10).result(timeout=30)
        torch.testing.assert_close(decode_tensor(reply.output), ref.to(out.dtype), rtol=1e-5, atol=1e-6)
        weights[1, 1] = float("nan")  # a slot this shard serves
        with pytest.raises(grpc.RpcError) as e:
            shard["stub"].RunExperts(req.to_proto(), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "topk_weights" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            socket.send(shard["address"], lambda: req, 10).result(timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "topk_weights" in e.value.details()
    finally:
        socket.close()
    check_valid(shard, 13)
