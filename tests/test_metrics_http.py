"""A gateway replica's GET /metrics text (openai_extras.prometheus_text) against what GatewayMetrics records: every
engine gauge it sets is exported under its documented name, and the expert series honour `expert_metrics`."""

from __future__ import annotations

import contextlib
import sys
import threading

import torch

from elasticmoe.gateway.openai_extras import prometheus_text
from elasticmoe.metrics import GatewayMetrics


def _series(text: str) -> dict[str, float]:
    """series (name and labels) -> value, as Prometheus scrapes them."""
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                     if line and not line.startswith("#"))}


def test_every_engine_gauge_is_exported():
    """The gateway sets running, queued and the KV-cache usage on every step; /metrics exported the first two only
    (elasticmoe_kv_cache_usage was looked up under a key the gauges are not kept by)."""
    m = GatewayMetrics("per_expert", 3, 4, [1, 2], use_ray=False)
    m.engine(running=3, queued=1, kv_usage=0.75)
    got = _series(prometheus_text(m))
    assert got["elasticmoe_running_seqs"] == 3 and got["elasticmoe_queued_seqs"] == 1
    assert got["elasticmoe_kv_cache_usage"] == 0.75


def test_expert_series_follow_the_expert_metrics_mode():
    """expert_metrics=per_layer bounds elasticmoe_expert_tokens_total to one series a layer (expert="all"), as Ray's
    export does; /metrics still wrote one series per (layer, expert). off writes none."""
    ids = torch.tensor([[0, 1], [1, 3]])
    got = {}
    for mode in ("per_expert", "per_layer", "off"):
        m = GatewayMetrics(mode, 3, 4, [1, 2], use_ray=False)
        m.route(1, ids)
        m.route(2, ids[:1])
        got[mode] = {k: v for k, v in _series(prometheus_text(m)).items() if "expert_tokens" in k}
    assert got["per_expert"] == {
        'elasticmoe_expert_tokens_total{layer="1",expert="0"}': 1,
        'elasticmoe_expert_tokens_total{layer="1",expert="1"}': 2,
        'elasticmoe_expert_tokens_total{layer="1",expert="3"}': 1,
        'elasticmoe_expert_tokens_total{layer="2",expert="0"}': 1,
        'elasticmoe_expert_tokens_total{layer="2",expert="1"}': 1}
    assert got["per_layer"] == {'elasticmoe_expert_tokens_total{layer="1",expert="all"}': 4,
                                'elasticmoe_expert_tokens_total{layer="2",expert="all"}': 2}
    assert got["off"] == {}


@contextlib.contextmanager
def _switching_often():
    """A GIL switch interval of 1 us: two threads interleave at nearly every chance."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_counters_keep_every_request_counted_from_two_event_loops():
    """The direct_grpc port's loop thread and Serve's count requests on one GatewayMetrics: `requests[k] =
    requests.get(k) + 1` from both lost about one count in seven under a short switch interval."""
    m = GatewayMetrics("off", 2, 2, [1], use_ray=False)
    n = 20_000

    def count() -> None:
        for _ in range(n):
            m.request("grpc", "ok")
            m.error("CANCELLED")
            m.ttft(0.1)

    with _switching_often():
        threads = [threading.Thread(target=count) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert m.requests == {("grpc", "ok"): 2 * n} and m.errors == {"CANCELLED": 2 * n}
    assert m.latency_counts["ttft"] == 2 * n


def test_a_scrape_while_another_loop_counts_a_new_code():
    """GET /metrics (Serve's loop) iterated the request and error counters while the direct_grpc port's loop added
    a code seen for the first time: "dictionary changed size during iteration", a 500 for the scrape."""
    with _switching_often():
        for _ in range(50):
            m = GatewayMetrics("off", 2, 2, [1], use_ray=False)
            for code in range(50):
                m.error(str(code))
            writer = threading.Thread(target=lambda: [m.error(f"X{c}") for c in range(300)])
            writer.start()
            try:
                while writer.is_alive():
                    prometheus_text(m)
            finally:
                writer.join()
            assert 'code="X299"' in prometheus_text(m)


def test_the_prefix_cache_counters_follow_the_engines_totals():
    """GatewayMetrics.engine_from (each step's gauges) takes the pool's prefix-cache totals: /metrics exports them
    as counters, and each later call adds only what they grew."""
    from elasticmoe.engine.kv_blocks import BlockPool
    from elasticmoe.engine.prefix_cache import block_keys
    from elasticmoe.engine.scheduler import Scheduler

    m = GatewayMetrics("off", 2, 4, [1], use_ray=False)
    pool = BlockPool(8, 4)
    sched = Scheduler(4, 64, 4, pool, prefix_caching=True)
    keys = block_keys(list(range(10, 19)), 4)
    assert pool.reserve("a", 3, keys, query=9)
    pool.register("a", keys)
    assert pool.reserve("b", 3, keys, query=9) and pool.hits("b") == 2
    m.engine_from(sched)
    got = _series(prometheus_text(m))
    assert got["elasticmoe_prefix_cache_queries_total"] == 18 and got["elasticmoe_prefix_cache_hits_total"] == 8
    assert pool.reserve("c", 2, keys[:1], query=5)
    m.engine_from(sched)
    assert m.prefix_cache == {"queries": 23, "hits": 12}


def test_the_preemption_counter_follows_the_engines_total(monkeypatch):
    """GatewayMetrics.engine_from takes the scheduler's preemptions: /metrics exports elasticmoe_preemptions_total,
    and a later call with none more adds nothing (blocks to the last: no admission watermark)."""
    from elasticmoe.engine import scheduler
    from elasticmoe.engine.kv_blocks import BlockPool
    from elasticmoe.engine.sampling import SamplingParams
    from elasticmoe.engine.scheduler import Scheduler, Sequence

    monkeypatch.setattr(scheduler, "WATERMARK", 0)
    m = GatewayMetrics("off", 2, 4, [1], use_ray=False)
    sched = Scheduler(2, 64, 4, BlockPool(2, 4))
    seqs = [Sequence(f"r{i}", [1, 2, 3, 4], SamplingParams(max_tokens=8)) for i in range(2)]
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule()) == 2  # a block each: the cache is full
    for s in seqs:
        s.output_ids.append(5)
        s.num_cached = 4
    sched.schedule()  # r0's 5th token needs a block: r1 is preempted
    assert sched.running == seqs[:1] and sched.preemptions == 1
    m.engine_from(sched)
    assert _series(prometheus_text(m))["elasticmoe_preemptions_total"] == 1
    m.engine_from(sched)
    assert m.preemptions == 1 and _series(prometheus_text(m))["elasticmoe_preemptions_total"] == 1
