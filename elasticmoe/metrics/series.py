"""The series exported through Ray's metrics API (as `ray_elasticmoe_*`): names, help texts, labels and buckets."""

from __future__ import annotations

from typing import Any

TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TPOT_BOUNDS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]
E2E_BOUNDS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0]
FANOUT_BOUNDS = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
KV_USAGE_HELP = ("KV-cache use: the larger of slots not free (a running sequence's, or one held back until "
                 "it is zeroed) / total slots and blocks reserved / total blocks")

PREFIX_QUERIES_HELP = "Prompt tokens of the requests admitted with prefix caching on (looked up in the cache)"
PREFIX_HITS_HELP = "Prompt tokens found in the prefix cache at admission (shared, not computed)"
PREEMPTIONS_HELP = "Running sequences preempted for KV-cache blocks (their tokens recomputed once readmitted)"


def ray_metrics() -> dict[str, Any] | None:
    """Create the Ray metric objects, or None when Ray isn't initialised (unit tests, offline use)."""
    try:
        import ray
        from ray.util.metrics import Counter, Gauge, Histogram
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None

    def hist(name: str, doc: str, bounds: list[float], tags: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, doc, boundaries=bounds, tag_keys=tags)

    return {
        "requests": Counter("elasticmoe_requests_total", "Client requests by API and outcome", ("api", "status")),
        "errors": Counter("elasticmoe_request_errors_total", "Failed client requests by error code", ("code",)),
        "ttft": hist("elasticmoe_ttft_seconds", "Time to first token, from the request's arrival", TTFT_BOUNDS),
        "tpot": hist("elasticmoe_tpot_seconds", "Time per output token after the first, per choice", TPOT_BOUNDS),
        "e2e": hist("elasticmoe_e2e_latency_seconds", "Request latency, arrival to last token", E2E_BOUNDS),
        "running": Gauge("elasticmoe_running_seqs", "Sequences in the running batch"),
        "queued": Gauge("elasticmoe_queued_seqs", "Requests waiting for a KV-cache slot"),
        "kv": Gauge("elasticmoe_kv_cache_usage", KV_USAGE_HELP),
        "prefix_queries": Counter("elasticmoe_prefix_cache_queries_total", PREFIX_QUERIES_HELP),
        "prefix_hits": Counter("elasticmoe_prefix_cache_hits_total", PREFIX_HITS_HELP),
        "preemptions": Counter("elasticmoe_preemptions_total", PREEMPTIONS_HELP),
        "expert_tokens": Counter("elasticmoe_expert_tokens_total", "Tokens routed to an expert",
                                 ("layer", "expert")),
        "copies": Gauge("elasticmoe_expert_copies", "Live copies of an expert", ("layer", "expert")),
        "balancedness": Gauge("elasticmoe_balancedness", "Mean / max load over a layer's shards", ("layer",)),
        "shard_healthy": Gauge("elasticmoe_shard_healthy", "1 if the expert shard answers, else 0", ("shard",)),
        "shard_registered": Gauge("elasticmoe_shard_registered",
                                  "1 while the controller has the expert shard registered, 0 once it left", ("shard",)),
        "fanout": hist("elasticmoe_fanout_latency_seconds", "Expert fan-out overhead per (layer, step)",
                       FANOUT_BOUNDS),
        "rebalance_events": Counter("elasticmoe_rebalance_events_total",
                                    "Placement changes applied, by reason: rebalance (the planner), scale_out, "
                                    "scale_in (a drain), rehome (after a shard was lost)", ("reason",)),
        "rebalance_bytes": Counter("elasticmoe_rebalance_bytes_total",
                                   "Expert weight bytes loaded by placement changes, by reason (as rebalance_events)",
                                   ("reason",)),
    }
