"""deploy/grafana/gla-serve.json: well-formed, and every series it queries is one server/metrics.py exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

DASHBOARD = json.loads((Path(__file__).resolve().parents[2] / "deploy/grafana/gla-serve.json").read_text())
METRIC = re.compile(r"\b(?:gla:[a-z0-9_]+|(?:process|python)_[a-z0-9_]+)")


def exposed_names() -> set[str]:
    body, _ = Metrics().render()
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def queries() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in DASHBOARD["panels"]
            for target in panel.get("targets", [])]


def test_every_queried_metric_is_exposed() -> None:
    exposed = exposed_names()
    referenced = {name for _, expr in queries() for name in METRIC.findall(expr)}
    assert referenced and referenced - exposed == set()


def test_every_query_names_a_metric() -> None:
    assert [title for title, expr in queries() if not METRIC.search(expr)] == []


def test_the_issue_panels_are_there() -> None:
    exprs = "\n".join(expr for _, expr in queries())
    for needle in [
        "histogram_quantile(0.5, sum by (le) (rate(gla:time_to_first_token_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(gla:time_to_first_token_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(gla:inter_token_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(gla:inter_token_latency_seconds_bucket",
        "sum(rate(gla:generation_tokens_total",
        "sum(gla:num_requests_waiting)",
        "sum by (tier) (rate(gla:state_cache_hits_total[$__rate_interval])) / "
        "sum by (tier) (rate(gla:state_cache_queries_total",
        "sum by (reason) (rate(gla:request_failure_total",
    ]:
        assert needle in exprs, needle


def test_layout_ids_and_datasource() -> None:
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(0 <= p["gridPos"]["x"] and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in panels)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
