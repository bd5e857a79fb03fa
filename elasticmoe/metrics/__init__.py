"""Metrics on Ray's metrics API: the exported series (series.py) and one process's counting of them (gateway.py)."""

from elasticmoe.metrics.gateway import EXPERT_METRIC_MODES, PLACEMENT_REASONS, GatewayMetrics, log_this_time
from elasticmoe.metrics.series import KV_USAGE_HELP

__all__ = ["EXPERT_METRIC_MODES", "KV_USAGE_HELP", "PLACEMENT_REASONS", "GatewayMetrics", "log_this_time"]
