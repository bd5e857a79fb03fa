"""Property-based fuzzing of the ExpertShard API over a real in-process gRPC shard (mTLS): random and mutated
RunExpertsRequests and raw bytes get OK or INVALID_ARGUMENT (never INTERNAL from our code), interleaved valid calls
stay exact against the single-process experts, and the shard keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model import open_model
from elasticmoe.model.dispatch import LocalDispatcher
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, decode_tensor, encode_tensor
from tests.fuzz_util import FUZZ

E, K = 8, 2
DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "uint8", "bool", "float64", "complex64", "", "nope"]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    from elasticmoe.model.tiny import make_tiny_model

    files = open_model(str(make_tiny_model("mixtral", tmp_path_factory.mktemp("sf") / "m", layers=2, experts=E)))
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    layers = files.spec.moe.moe_layers
    store.load([(l, e) for l in layers for e in range(E)])
    server, servicer, port = start_server(store, "fuzz", max_rows=64)
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    yield {"address": f"127.0.0.1:{port}", "stub": pb_grpc.ExpertShardStub(ch),
           "raw": ch.unary_unary("/elasticmoe.internal.v1.ExpertShard/RunExperts"),
           "store": store, "files": files, "layers": layers, "hidden": files.spec.hidden_size}
    ch.close()
    server.stop(None)


def _inputs(shard, seed: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A well-formed call's layer, hidden [T, H], topk ids [T, K] and weights [T, K]."""
    g = torch.Generator().manual_seed(seed)
    t, layer = 1 + seed % 7, shard["layers"][seed % len(shard["layers"])]
    hidden = torch.randn(t, shard["hidden"], generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    return layer, hidden, ids, torch.rand(t, K, generator=g)


def _request(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> pb.RunExpertsRequest:
    return pb.RunExpertsRequest(layer=layer, hidden=encode_tensor(hidden), topk_ids=encode_tensor(ids.to(torch.int32)),
                                topk_weights=encode_tensor(weights))


def _valid(shard, seed: int) -> tuple[pb.RunExpertsRequest, torch.Tensor]:
    """A well-formed request and the single-process answer [T, H]."""
    layer, hidden, ids, weights = _inputs(shard, seed)
    ref = LocalDispatcher(shard["store"]).dispatch(layer, hidden, ids, weights).wait()
    return _request(layer, hidden, ids, weights), ref


BASES: dict[int, bytes] = {}  # seed -> a well-formed request's bytes: the fuzzer's bases, built once (no answer)


def _base(seed: int) -> pb.RunExpertsRequest:
    if seed not in BASES:
        BASES[seed] = _request(*_inputs(SHARD, seed)).SerializeToString()
    return pb.RunExpertsRequest.FromString(BASES[seed])  # a fresh copy to mutate


def _check_valid(shard, seed: int) -> None:
    req, ref = _valid(shard, seed)
    out = decode_tensor(shard["stub"].RunExperts(req, timeout=30).output)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-6)  # float64 partial sums


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
            _check_valid(shard, seed)  # neighbours stay exact

    run()
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen
    _check_valid(shard, 7)


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
    _check_valid(shard, 11)


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
    _check_valid(shard, 3)
    with pytest.raises(ValueError):
        shard["store"].load([(-1, 0)])  # not Python's last layer


def test_a_wrong_dtype_is_refused_naming_the_dtypes_taken(shard):
    """float64 hidden states (or weights), or float ids: INVALID_ARGUMENT naming the dtypes a shard takes (the message
    once said float64 'must be floating point'); the shard keeps serving."""
    req, _ = _valid(shard, 5)
    for field, cast in (("hidden", torch.float64), ("topk_weights", torch.float64), ("topk_ids", torch.float32)):
        bad = pb.RunExpertsRequest()
        bad.CopyFrom(req)
        getattr(bad, field).CopyFrom(encode_tensor(decode_tensor(getattr(req, field)).to(cast)))
        with pytest.raises(grpc.RpcError) as e:
            shard["stub"].RunExperts(bad, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value.details())
        assert "float32, float16 or bfloat16" in e.value.details() and "int32 or int64" in e.value.details()
        assert f"{field} {cast}".replace("torch.", "") in e.value.details(), e.value.details()
    _check_valid(shard, 5)


def _own_store(shard, pairs) -> ExpertStore:
    files = shard["files"]
    store = ExpertStore(files.ckpt, files.names, files.spec, torch.float32, torch.device("cpu"))
    store.load(pairs)
    return store


def test_stats_during_a_load_that_adds_a_layer(shard, monkeypatch):
    """GetStats (held, weight_bytes) runs on another worker than a LoadExperts; a load that finishes a new layer
    while GetStats walks the layers must not break it ("dictionary changed size during iteration"), nor make the two
    disagree (they were read in two looks: the bytes of 2 experts beside 3 held)."""
    from elasticmoe.experts.server import ExpertServicer
    from elasticmoe.model import experts as experts_mod

    l0, l1 = shard["layers"][:2]
    store = _own_store(shard, [(l0, 0), (l0, 1)])
    servicer = ExpertServicer(store, "stats")
    other = _own_store(shard, [(l1, 2)]).layers[l1]
    parts, one = experts_mod.LayerExperts.parts, store.weight_bytes() // 2  # each expert's bytes (same shapes)

    def parts_then_load(self):  # a concurrent load publishes layer l1 between two steps of the walk
        store.layers.setdefault(l1, other)
        return parts(self)

    monkeypatch.setattr(experts_mod.LayerExperts, "parts", parts_then_load)
    stats = servicer.GetStats(pb.GetStatsRequest(), None)
    assert stats.weight_bytes > 0 and {(r.layer, r.expert) for r in stats.held} <= {(l0, 0), (l0, 1), (l1, 2)}
    assert stats.weight_bytes == one * len(stats.held), (stats.weight_bytes // one, len(stats.held))


def test_drop_experts_counts_with_a_load_landing_meanwhile(shard):
    """DropExperts' dropped / bytes count that call's own drop: a LoadExperts (another worker: e.g. the controller
    dropping after its load timed out) completing between the drop and the count must not make them negative
    (uint fields: the call failed though the drop was done) or the load's `loaded` wrong."""
    import threading

    from elasticmoe.experts.server import ExpertServicer

    l0, l1 = shard["layers"][:2]
    store = _own_store(shard, [(l0, e) for e in range(4)])
    servicer = ExpertServicer(store, "counts")
    one = store.weight_bytes() // 4
    drop, replies = store.drop, {}

    def load() -> None:
        replies["load"] = servicer.LoadExperts(
            pb.LoadExpertsRequest(experts=[pb.ExpertRef(layer=l1, expert=e) for e in range(E)]), None)

    def drop_then_a_load_lands(pairs) -> None:
        drop(pairs)
        loader = threading.Thread(target=load)
        loader.start()
        loader.join(timeout=1.0)  # with the counts serialised, it waits for this DropExperts to answer

    store.drop = drop_then_a_load_lands
    dropped = servicer.DropExperts(pb.DropExpertsRequest(experts=[pb.ExpertRef(layer=l0, expert=0)]), None)
    assert (dropped.dropped, dropped.bytes) == (1, one)
    for _ in range(100):
        if "load" in replies:
            break
        threading.Event().wait(0.05)
    assert replies["load"].loaded == E and len(store.held()) == 3 + E


def test_stats_counters_exact_under_concurrent_calls(shard):
    """RunExperts runs on up to run_slots threads at once (plus one per stream / frame connection): the tokens per
    expert and the calls GetStats reports (the autoscaler's placement input) must not lose updates."""
    import sys
    import threading

    from elasticmoe.experts.server import ExpertServicer, _FrameContext

    store = ExpertStore(shard["files"].ckpt, shard["files"].names, shard["files"].spec, torch.float32,
                        torch.device("cpu"))
    servicer = ExpertServicer(store, "counters")
    req, _ = _valid(shard, 1)  # no expert held here: each call answers `missing` (cheap), counted all the same
    counts, calls, threads = 10000, 400, 8

    def run(work) -> None:
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def count() -> None:
        for _ in range(counts):
            store.count(0, {1: 1, 2: 2})

    def call() -> None:
        for _ in range(calls):
            assert servicer._compute(req, _FrameContext)[1]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        run(count)
        run(call)
    finally:
        sys.setswitchinterval(interval)
    assert store.served.tokens_served == {(0, 1): counts * threads, (0, 2): 2 * counts * threads}
    assert store.served.calls == counts * threads  # GetStats' calls: the served ones (count())
    assert servicer.calls == calls * threads  # taken (answered `missing` here)


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
    _check_valid(shard, 13)


def test_get_stats_compute_us_is_the_sum_of_the_answers(shard):
    """experts.proto: GetStats' compute_us is the "sum of RunExpertsResponse.compute_us since start". 4 threads of
    RunExperts over unary gRPC and the frame socket at once (some of 0 tokens, some slots -1): GetStats' calls, tokens
    per expert and compute_us grow by exactly what the answers say. It was the forward's own time summed
    in float seconds, a narrower window than the answers' (about 1% less on this CPU)."""
    import threading

    from elasticmoe.gateway.socket_transport import SocketTransport
    from elasticmoe.rpc.frames import ExpertRequest

    stub, layer = shard["stub"], shard["layers"][0]
    socket, lock, answers = SocketTransport(), threading.Lock(), []
    before = stub.GetStats(pb.GetStatsRequest(), timeout=10)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for i in range(40):
            t = i % 5  # 0 tokens now and then
            ids = torch.randint(-1, E, (t, K), generator=g, dtype=torch.int32)  # [T, K], -1: another shard's slot
            req = ExpertRequest(layer, torch.randn(t, shard["hidden"], generator=g), ids, torch.rand(t, K, generator=g))
            reply = (stub.RunExperts(req.to_proto(), timeout=30) if (seed + i) % 2 else
                     socket.send(shard["address"], lambda: req, 10).result(timeout=30))
            with lock:
                answers.append((reply.compute_us, ExpertStore.routed(ids)))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        socket.close()
    after = stub.GetStats(pb.GetStatsRequest(), timeout=10)
    assert len(answers) == 160 and after.calls - before.calls == 160
    assert after.compute_us - before.compute_us == sum(us for us, _ in answers) > 0
    tokens = {(t.layer, t.expert): t.tokens for t in after.tokens}
    for t in before.tokens:
        tokens[t.layer, t.expert] -= t.tokens
    want: dict = {}
    for _, routed in answers:
        for e, n in routed.items():
            want[layer, e] = want.get((layer, e), 0) + n
    assert {k: n for k, n in tokens.items() if n} == want


def test_get_stats_counts_the_calls_served_only(shard):
    """experts.proto: GetStats' calls, tokens and compute_us count the same calls, those served (answered with an
    output). A call answered with `missing` (an expert not held here: a stale route) computes nothing; it counted in
    `calls` though not in tokens or compute_us, so compute_us / calls fell with every stale route."""
    l0 = shard["layers"][0]
    store = _own_store(shard, [(l0, e) for e in range(E // 2)])
    server, servicer, port = start_server(store, "half", max_rows=64)
    ch = tls.channel(f"127.0.0.1:{port}", channel_options())
    stub = pb_grpc.ExpertShardStub(ch)
    g = torch.Generator().manual_seed(5)
    hidden, weights = torch.randn(3, shard["hidden"], generator=g), torch.rand(3, K, generator=g)  # [T, H], [T, K]

    def run(ids: list[list[int]]) -> pb.RunExpertsResponse:
        return stub.RunExperts(pb.RunExpertsRequest(
            layer=l0, hidden=encode_tensor(hidden), topk_ids=encode_tensor(torch.tensor(ids, dtype=torch.int32)),
            topk_weights=encode_tensor(weights)), timeout=30)
    try:
        served = run([[0, 1], [2, 3], [1, -1]])
        missed = run([[0, E - 1], [2, 3], [1, -1]])
        assert served.output.data and not missed.output.data and list(missed.missing) == [E - 1]
        st = stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert (st.calls, st.compute_us) == (1, served.compute_us)
        assert {(t.layer, t.expert): t.tokens for t in st.tokens} == {(l0, 0): 1, (l0, 1): 2, (l0, 2): 1, (l0, 3): 1}
        assert servicer.calls == 2  # both taken
    finally:
        ch.close()
        server.stop(None)
