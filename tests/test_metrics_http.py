"""A gateway replica's GET /metrics text (openai_extras.prometheus_text) against what GatewayMetrics records: every
engine gauge it sets is exported under its documented name, and the expert series honour `expert_metrics`."""

from __future__ import annotations

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
        'elasticmoe_expert_tokens_total{layer="1",expert="0"}': 1, 'elasticmoe_expert_tokens_total{layer="1",expert="1"}': 2,
        'elasticmoe_expert_tokens_total{layer="1",expert="3"}': 1, 'elasticmoe_expert_tokens_total{layer="2",expert="0"}': 1,
        'elasticmoe_expert_tokens_total{layer="2",expert="1"}': 1}
    assert got["per_layer"] == {'elasticmoe_expert_tokens_total{layer="1",expert="all"}': 4,
                                'elasticmoe_expert_tokens_total{layer="2",expert="all"}': 2}
    assert got["off"] == {}
