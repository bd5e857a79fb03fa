"""The chart's Grafana dashboards against the code: every metric an expression reads is one elasticmoe defines
(Ray exports it as ray_<name>, a histogram as its _bucket / _sum / _count series), and the shard panels show the
shards the controller has registered, not the series a departed shard leaves behind (Ray's Gauge cannot drop one)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.test_deploy_configs import CHART_DIR

PACKAGE = Path(__file__).resolve().parent.parent / "elasticmoe"
DASHBOARDS = sorted((CHART_DIR / "dashboards").glob("*.json"))
KINDS = {"Counter": ("",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
         "hist": ("_bucket", "_sum", "_count")}  # hist: metrics/series.py's Histogram helper
HEALTHY, REGISTERED = "ray_elasticmoe_shard_healthy", "ray_elasticmoe_shard_registered"


def _exported() -> set[str]:
    """The series names Ray exports for the metrics the package creates: Counter / Gauge / Histogram("name", ...)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in KINDS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names |= {f"ray_{node.args[0].value}{suffix}" for suffix in KINDS[node.func.id]}
    return names


def _exprs(node) -> list[str]:
    """Every "expr" in a dashboard, in rows and nested panels too."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr"] + [e for v in node.values() for e in _exprs(v)]
    return [e for v in node for e in _exprs(v)] if isinstance(node, list) else []


def _targets(dash: dict) -> list[tuple[str, str, str]]:
    """(panel title, legend, expr) of every target."""
    panels = list(dash["panels"]) + [q for p in dash["panels"] for q in p.get("panels", [])]
    return [(p["title"], t.get("legendFormat", ""), t["expr"]) for p in panels for t in p.get("targets", [])]


def _metrics_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a name before its {matchers}, and any elasticmoe_ name)."""
    selected = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    return selected | set(re.findall(r"\b(?:ray_)?elasticmoe_\w+", expr))


def test_the_package_defines_the_metrics_it_documents():
    exported = _exported()
    assert {HEALTHY, REGISTERED, "ray_elasticmoe_requests_total", "ray_elasticmoe_ttft_seconds_bucket"} <= exported


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_metric_is_one_the_code_defines(path):
    exprs = _exprs(json.loads(path.read_text()))
    assert exprs
    exported = _exported()  # parses the whole package: once, not once per metric read
    unknown = {(m, e) for e in exprs for m in _metrics_in(e) if m not in exported}
    assert not unknown, f"metrics no code of elasticmoe exports: {sorted(unknown)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_shard_panels_count_registered_shards_only(path):
    """A shard that left keeps its elasticmoe_shard_healthy series at 0 forever: counted, it was a ghost in the
    total; plotted, a dead line. Every read of it keeps only the shards the controller still has registered."""
    targets = [t for t in _targets(json.loads(path.read_text())) if HEALTHY in t[2]]
    assert targets
    live = re.compile(r"and on \(shard\) \(min by \(shard\) \(" + REGISTERED + r"\{[^}]*\}\) == 1\)")
    for title, legend, expr in targets:
        assert live.search(expr), f"{title} / {legend}: {expr}"
        assert not re.search(r"count\s*\(\s*min by \(shard\) \(" + HEALTHY, expr), f"{title}: counts ghosts"
    totals = [e for title, legend, e in _targets(json.loads(path.read_text())) if legend == "total"]
    assert totals and all(REGISTERED in e and HEALTHY not in e for e in totals), totals


def test_the_error_ratio_leaves_out_clients_that_went_away_and_requests_without_a_key():
    """A client that went away (a disconnect: 499; a cancel or deadline: CANCELLED) counts as status cancelled, not
    error (elasticmoe.metrics), yet request_errors_total records its code: the Error ratio panel must leave those
    codes out, or a burst of impatient clients reads as a server failing. A request without a valid key is counted
    (status unauthenticated, code 401 / UNAUTHENTICATED: operators see auth failures), but it never reached the
    API: a Prometheus scraper given no key, hitting a gateway's /metrics every 15 s, raised the error ratio of an
    idle cluster to 1. It is left out of the ratio, above and below the line."""
    import grpc

    from elasticmoe.gateway.auth import Unauthenticated
    from elasticmoe.gateway.grpc_api import status_of
    from elasticmoe.gateway.openai_choices import STATUS_OF

    gone = sorted(str(code) for code, status in STATUS_OF.items() if status == "cancelled")  # HTTP's
    assert gone == ["499"] and grpc.StatusCode.CANCELLED.name == "CANCELLED"  # the codes the doors record
    assert [c for c, status in STATUS_OF.items() if status == "unauthenticated"] == [401]
    code, _, status = status_of(Unauthenticated("no key"))
    assert (code.name, status) == ("UNAUTHENTICATED", "unauthenticated")

    def panels(node):
        if isinstance(node, dict):
            return ([node] if "title" in node else []) + [p for v in node.values() for p in panels(v)]
        return [p for v in node for p in panels(v)] if isinstance(node, list) else []

    panels = [p for d in DASHBOARDS for p in panels(json.loads(d.read_text())) if p.get("title") == "Error ratio"]
    assert panels, "no Error ratio panel"
    for panel in panels:
        for expr in _exprs(panel):
            errors = re.search(r"ray_elasticmoe_request_errors_total\{([^}]*)\}", expr)
            assert errors and 'code!~"499|CANCELLED|401|UNAUTHENTICATED"' in errors.group(1), expr
            finished = re.search(r"ray_elasticmoe_requests_total\{([^}]*)\}", expr)
            assert finished and 'status!="unauthenticated"' in finished.group(1), expr


def _panels_reading(metric: str) -> list[dict]:
    """Every panel (rows' nested panels too) with a target whose expression reads `metric`."""
    found = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for p in list(dash["panels"]) + [q for p in dash["panels"] for q in p.get("panels", [])]:
            if any(metric in t["expr"] for t in p.get("targets", [])):
                found.append(p)
    return found


def _callers(method: str) -> set[str]:
    """The package's modules (paths under elasticmoe/) that call `.method(...)`."""
    return {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
            if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method
                   for n in ast.walk(ast.parse(path.read_text(), str(path))))}


def test_panel_descriptions_say_whose_view_and_what_unit_a_series_is():
    """The shard-health series are the controller's view (its stats call, else its health check: only
    autoscaler/stats.py sets them), yet two panels told the operator they were every gateway's (a shard a gateway
    cannot reach showed healthy there, described as answering every gateway); the KV-cache gauge counts slots, one a
    sequence (GatewayMetrics.engine_from), not blocks, and a slot held back to be zeroed as used."""
    assert _callers("set_shard_health") == {"autoscaler/stats.py"}
    shard_panels = _panels_reading(HEALTHY)
    assert len(shard_panels) >= 2
    for p in shard_panels:
        assert "controller" in p["description"] and "gateway" not in p["description"], (p["title"], p["description"])
    from elasticmoe.metrics import KV_USAGE_HELP, GatewayMetrics

    assert "slots" in (GatewayMetrics.engine_from.__doc__ or "") and "held back" in KV_USAGE_HELP
    for p in _panels_reading("ray_elasticmoe_kv_cache_usage"):  # a slot held back to be zeroed is used, not free
        assert "block" not in p.get("description", ""), (p["title"], p["description"])
        assert "held back" in p.get("description", ""), (p["title"], p["description"])
