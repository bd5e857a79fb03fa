"""GetStats of a real in-process gRPC shard under concurrent loads, drops and calls (held experts, weight bytes,
calls, tokens per expert and compute_us exact), over unary RunExperts and the frame listener."""

from __future__ import annotations

import torch

from elasticmoe.experts.shard_server import start_server
from elasticmoe.model.experts import ExpertStore
from elasticmoe.rpc import experts_pb2 as pb
from elasticmoe.rpc import experts_pb2_grpc as pb_grpc
from elasticmoe.rpc import tls
from elasticmoe.rpc.codec import channel_options, encode_tensor
from tests.grpc_shard import E, K, shard, valid  # noqa: F401 - shard: the fixture


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
    req, _ = valid(shard, 1)  # no expert held here: each call answers `missing` (cheap), counted all the same
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
