"""docs/grafana-dashboard.json: its panels and the metric names it queries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from autopull.streams.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
DATASOURCE = "${DS_PROMETHEUS}"
# The two gauges that Pipeline._register_gauges in streams/app.py adds. They read the
# running consumer and tables, so a Pipeline that never started cannot collect them.
APP_GAUGES = {"autopull_consumer_lag", "autopull_table_keys"}
# The sample names that the Prometheus text format gives each metric type.
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}
METRIC_NAME = re.compile(r"\bautopull_[a-zA-Z0-9_]+")


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def exposed_names() -> set[str]:
    """Return every sample name that a worker's /metrics can contain."""
    names = set(APP_GAUGES)
    for family in Metrics().registry.collect():
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names.add(family.name + suffix)
    return names


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Return the PromQL of every panel target and every query variable."""
    found = [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["query"]["query"])
    return found


def test_dashboard_declares_prometheus_input() -> None:
    dashboard = load_dashboard()
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert dashboard["schemaVersion"] >= 39


def test_dashboard_panels_have_title_and_target() -> None:
    panels = load_dashboard()["panels"]
    assert panels
    for panel in panels:
        assert panel.get("title"), f"Panel {panel.get('id')} has no title."
        assert panel.get("targets"), f"Panel {panel['title']!r} has no target."


def test_dashboard_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in load_dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_targets_use_prometheus_input() -> None:
    for panel in load_dashboard()["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_metrics_exist_in_registry() -> None:
    known = exposed_names()
    for expression in expressions(load_dashboard()):
        used = set(METRIC_NAME.findall(expression))
        assert used, f"The expression {expression!r} queries no autopull metric."
        assert used <= known, f"Unknown metrics {used - known} in {expression!r}."


@pytest.mark.parametrize(
    ("expression", "valid"),
    [
        ("rate(autopull_pulls_total[5m])", True),
        ("rate(autopull_pulls[5m])", False),
        ("autopull_pull_latency_seconds_bucket", True),
        ("autopull_pull_latency_seconds_total", False),
    ],
)
def test_exposed_names_match_sample_names(expression: str, valid: bool) -> None:
    used = set(METRIC_NAME.findall(expression))
    assert (used <= exposed_names()) is valid
