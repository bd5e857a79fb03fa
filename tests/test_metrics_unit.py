"""GatewayMetrics without Ray: in-process expert-token counts per mode, request counters, cheap routing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from elasticmoe.metrics import GatewayMetrics

LAYERS, EXPERTS, MOE_LAYERS = 3, 8, [1, 2]


def _metrics(mode: str = "per_expert") -> GatewayMetrics:
    m = GatewayMetrics(mode, LAYERS, EXPERTS, MOE_LAYERS, use_ray=False)
    assert not m.exporting  # in-process only, even when another test initialised Ray in this process
    return m


def test_route_counts_sum_to_tokens_times_k_times_calls():
    m = _metrics()
    g = torch.Generator().manual_seed(0)
    calls, tokens, k = 25, 13, 2
    expected = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    for i in range(calls):
        layer = MOE_LAYERS[i % 2]
        ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:k] for _ in range(tokens)])  # [T, k]
        m.route(layer, ids)
        np.add.at(expected[layer], ids.reshape(-1).numpy(), 1)
    totals = m.expert_token_totals()
    assert totals.shape == (LAYERS, EXPERTS) and totals.dtype == np.int64
    assert totals.sum() == calls * tokens * k
    np.testing.assert_array_equal(totals, expected)
    assert totals[0].sum() == 0  # a dense layer never routes


def test_totals_accumulate_across_reads_and_accept_int32_ids():
    m = _metrics()
    m.route(1, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))
    first = m.expert_token_totals()
    m.route(1, torch.tensor([[1, 7]]))
    second = m.expert_token_totals()
    assert first[1].tolist() == [1, 2, 1, 0, 0, 0, 0, 0]
    assert second[1].tolist() == [1, 3, 1, 0, 0, 0, 0, 1]
    first[1, 0] = 99  # a copy: callers can't corrupt the totals
    assert m.expert_token_totals()[1, 0] == 1


def test_routing_inside_inference_mode_reads_outside():
    m = _metrics()
    with torch.inference_mode():  # as the engine thread calls it
        m.route(1, torch.tensor([[2, 3]]))
    assert m.expert_token_totals()[1].sum() == 2
    m.route(1, torch.tensor([[2, 4]]))  # and outside inference mode too
    with torch.inference_mode():
        m.route(1, torch.tensor([[2, 5]]))
    assert m.expert_token_totals()[1].tolist() == [0, 0, 3, 1, 1, 1, 0, 0]


def test_negative_ids_are_ignored_and_empty_batches_are_fine():
    m = _metrics()
    m.route(2, torch.tensor([[3, -1], [-1, 3]]))
    m.route(2, torch.empty((0, 2), dtype=torch.int64))
    assert m.expert_token_totals()[2].tolist() == [0, 0, 0, 2, 0, 0, 0, 0]


def test_per_layer_mode_keeps_the_same_in_process_totals():
    m = _metrics("per_layer")
    m.route(1, torch.tensor([[0, 5], [5, 6]]))
    assert m.expert_token_totals().sum() == 4 and m.expert_token_totals()[1, 5] == 2
    m.flush()  # exports nothing without Ray, and must not raise


def test_off_mode_records_nothing():
    m = _metrics("off")
    m.route(1, torch.tensor([[0, 1]]))
    assert m.expert_token_totals().sum() == 0


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="expert_metrics"):
        GatewayMetrics("per_token", LAYERS, EXPERTS, MOE_LAYERS)


def test_request_and_control_plane_counters():
    m = _metrics("per_layer")
    m.request("http", "ok")
    m.request("http", "ok")
    m.request("grpc", "rejected")
    m.error(429)
    m.ttft(0.1), m.tpot(0.01), m.e2e(1.0)
    m.engine(running=3, queued=1, kv_usage=0.75)
    m.copies(1, 0, 2), m.copies(1, 1, 1), m.copies(1, 0, 3)
    m.balancedness(1, 0.9), m.set_shard_health({"shard-0": False}), m.rebalance(1024), m.fanout([1e-3, 2e-3])
    assert m.requests == {("http", "ok"): 2, ("grpc", "rejected"): 1} and m.errors == {"429": 1}
    assert m.latency_counts == {"ttft": 1, "tpot": 1, "e2e": 1}
    assert m.gauges["running"] == 3 and m.gauges["kv_usage"] == 0.75
    assert m.expert_copies == {(1, 0): 3, (1, 1): 1} and m.shards == {"shard-0": False}
    assert (m.rebalance_events, m.rebalance_bytes) == (1, 1024)
    m.rebalance(0, "rehome"), m.rebalance(2048, "scale_out")
    assert (m.rebalance_events, m.rebalance_bytes) == (3, 3072)
    assert m.rebalance_reasons == {"rebalance": 1, "rehome": 1, "scale_out": 1}  # every placement change, by why
    with pytest.raises(ValueError, match="reason"):  # a bounded label set
        m.rebalance(0, "re-home after health check failed")


def test_route_is_cheap_and_thread_safe():
    m = _metrics()
    ids = torch.randint(0, EXPERTS, (256, 2))
    m.route(1, ids)  # warm up
    t0 = time.perf_counter()
    for _ in range(200):
        m.route(1, ids)
    per_call = (time.perf_counter() - t0) / 200
    assert per_call < 2e-3, f"route() took {per_call * 1e6:.0f} us per call"

    def worker() -> None:
        for _ in range(100):
            m.route(2, ids)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(20):
        m.expert_token_totals()  # concurrent reads while the "engine" routes
    for t in threads:
        t.join()
    assert m.expert_token_totals()[2].sum() == 2 * 100 * ids.numel()


def _placement_copies(layers: int, experts: int, shards: int = 4) -> np.ndarray:
    from elasticmoe.placement.placement import Placement

    slots = 2 * experts // shards + 2
    return Placement.even(layers, experts, shards, slots, 2).num_copies()  # [L, E]


def _best_time(fn, repeats: int = 5) -> float:
    """The best of `repeats` runs in this thread's CPU time: wall time on a loaded machine counts the other
    processes' turns (CI once measured 81x for 16x the work, a 0.14 ms run beside an 11 ms one)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


@pytest.mark.parametrize("bulk", [True, False], ids=["set_copies", "copies_per_expert"])
def test_copies_metrics_cost_grows_linearly_in_layers_times_experts(bulk):
    """A placement change exports every expert's copies: 16x the (layer, expert) pairs must cost about 16x, not
    256x (the per-layer sum used to be recounted over all pairs on every expert's update)."""
    times, sizes = [], [(4, 64), (16, 256)]  # L*E = 256 and 4096
    for layers, experts in sizes:
        m = GatewayMetrics("per_layer", layers, experts, list(range(layers)), use_ray=False)
        counts = _placement_copies(layers, experts)
        moe = list(range(layers))

        def export() -> None:
            if bulk:
                m.set_copies(moe, counts)
            else:
                for l, row in enumerate(counts.tolist()):
                    for e, n in enumerate(row):
                        m.copies(l, e, n)

        times.append(_best_time(export))
        assert m.layer_copies == {l: int(counts[l].sum()) for l in moe}
        assert len(m.expert_copies) == layers * experts and m.expert_copies[(layers - 1, experts - 1)] == counts[-1, -1]
    ratio = times[1] / times[0]
    assert ratio < 48, f"16x the experts cost {ratio:.0f}x ({times[0] * 1e3:.2f} ms -> {times[1] * 1e3:.2f} ms)"


def test_layer_copies_follow_changes_and_repeats():
    m = _metrics("per_layer")
    m.set_copies([1, 2], np.array([[1] * EXPERTS, [2] * EXPERTS]))
    assert m.layer_copies == {1: EXPERTS, 2: 2 * EXPERTS}
    m.copies(1, 3, 4)  # 1 -> 4
    m.set_copies([1, 2], np.array([[1] * EXPERTS, [2] * EXPERTS]))  # back, idempotent
    m.copies(2, 0, 0)
    assert m.layer_copies == {1: EXPERTS, 2: 2 * EXPERTS - 2} and m.expert_copies[(2, 0)] == 0


class _SeenGauge:
    """Stands where Ray's Gauge is (Ray is not initialised here): the last value set per tag set."""

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] = value


def test_a_removed_shard_leaves_no_healthy_series():
    """A shard gone from the controller's registry is forgotten in process and its exported series set to 0 (a
    Ray gauge cannot drop a series: left at 1 it showed a healthy ghost shard on dashboards)."""
    m = _metrics()
    gauge = _SeenGauge()
    m._ray = {"shard_healthy": gauge, "shard_registered": _SeenGauge()}
    m.set_shard_health({"a": True, "b": True, "c": False})
    assert m.shards == {"a": True, "b": True, "c": False}
    m.set_shard_health({"a": True, "c": True})
    assert m.shards == {"a": True, "c": True}
    assert gauge.values == {(("shard", "a"),): 1.0, (("shard", "b"),): 0.0, (("shard", "c"),): 1.0}


def test_a_removed_shard_is_exported_as_unregistered():
    """elasticmoe_shard_registered tells a shard that left (0, its series kept by Ray) from one that is there but
    does not answer (registered 1, healthy 0): dashboards count and plot the registered shards only."""
    m = _metrics()
    healthy, registered = _SeenGauge(), _SeenGauge()
    m._ray = {"shard_healthy": healthy, "shard_registered": registered}
    m.set_shard_health({"a": True, "b": False})
    m.set_shard_health({"a": True})
    assert registered.values == {(("shard", "a"),): 1.0, (("shard", "b"),): 0.0}
    assert healthy.values == {(("shard", "a"),): 1.0, (("shard", "b"),): 0.0}
    m.set_shard_health({"b": False})  # back under the same id (a restarted replica), not answering yet
    assert registered.values == {(("shard", "a"),): 0.0, (("shard", "b"),): 1.0}


def test_a_request_failing_after_its_first_token_counts_its_ttft_on_both_doors():
    """gRPC observes TTFT at the first token, whatever comes after; HTTP observed it only for requests that ended
    ok, so a stream cut after its first token (the client gone, 499; a shard failure, 503) left the histogram
    short on one door. A request failing before any token observes none on either."""
    from types import SimpleNamespace

    from elasticmoe.gateway.openai_choices import Tally

    m = GatewayMetrics("off", 2, 2, [1], use_ray=False)
    core = SimpleNamespace(metrics=m)  # what Tally reads of the gateway core
    cut = Tally(core)
    cut.first_token()
    cut.record(499)
    refused = Tally(core)
    refused.record(400)
    assert m.latency_counts["ttft"] == 1 and m.requests == {("http", "cancelled"): 1, ("http", "invalid"): 1}


class _AgentDown(GatewayMetrics):
    """Real metrics whose export to Ray raises while `down` (Ray's metrics agent gone, a device copy failing)."""

    down = True
    attempts = 0

    def flush(self) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("injected: the metrics agent is unreachable")
        super().flush()


def test_a_failing_flush_is_counted_and_logged_at_1_10_100_not_each_time(caplog):
    """The flush thread swallowed every exception silently: a gateway whose metrics had stopped going out looked
    healthy. Each failure is counted (flush_errors, shown by the gateway's stats and the controller's status) and
    the 1st, 10th, 100th are logged (with the traceback); the thread keeps flushing, close() does not raise."""
    m = _AgentDown("per_expert", LAYERS, EXPERTS, MOE_LAYERS, flush_interval_s=0.001, use_ray=False)
    flusher = threading.Thread(target=m._flush_loop, daemon=True)  # the thread Ray's presence would start
    with caplog.at_level("ERROR", logger="elasticmoe.metrics"):
        flusher.start()
        deadline = time.monotonic() + 30
        while m.flush_errors < 120:
            assert time.monotonic() < deadline, m.flush_errors
            time.sleep(0.005)
        m.down = False
        m.route(1, torch.tensor([[0, 1]]))
        errors = m.flush_errors
        m.close()  # a last flush, which works again
        flusher.join(5)
    assert not flusher.is_alive() and m.flush_errors == errors and m.attempts > errors
    logged = [r for r in caplog.records if "exporting metrics to Ray raised" in r.getMessage()]
    assert [r.getMessage().split("(")[1] for r in logged] == ["1 times so far)", "10 times so far)",
                                                               "100 times so far)"]
    assert all(r.exc_info and r.exc_info[0] is ConnectionError for r in logged)
    assert m.expert_token_totals()[1, :2].tolist() == [1, 1]
