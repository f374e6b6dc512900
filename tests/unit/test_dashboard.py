"""docs/grafana/mcpq.json is a dashboard Grafana imports: the model's required
fields, unique panel ids, the ``$server`` variable and the ``${DS_PROMETHEUS}``
input; every query parses as PromQL (``promtool check rules`` on a rule file
made of them, Grafana's variables filled in) and names only metrics mcpq
exports (the tables of docs/observability.md).

No published JSON schema of the dashboard model is checked against: Grafana
publishes its schema as CUE and TypeScript (``@grafana/schema``), not as a
JSON schema on PyPI or npm, so the required fields are checked here instead."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.procs import REPO_ROOT

DASHBOARD = REPO_ROOT / "docs" / "grafana" / "mcpq.json"
OBSERVABILITY = REPO_ROOT / "docs" / "observability.md"
#: Grafana's own variables, as Prometheus would see them once filled in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$server": ".*"}
PANEL_FIELDS = {"id", "type", "title", "gridPos"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def load() -> dict[str, Any]:
    model: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return model


def all_panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in model["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold theirs
    return out


def queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(model)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def exported_metrics() -> dict[str, str]:
    """Metric name -> type, from the metric tables of docs/observability.md."""
    found = {}
    for line in OBSERVABILITY.read_text().splitlines():
        match = re.match(r"\| `(mcpq_[a-z_]+)` \| (counter|gauge|histogram) \|", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_dashboard_model_has_the_required_fields() -> None:
    model = load()
    for key in ("title", "panels", "schemaVersion", "templating", "uid", "time"):
        assert key in model, key
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    panels = all_panels(model)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert set(panel) >= PANEL_FIELDS, panel.get("title")
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
    kinds = {p["type"] for p in panels}
    assert {"timeseries", "state-timeline"} <= kinds
    # Every panel's refId is unique within it, and every query panel has a datasource.
    for panel in panels:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_datasource_is_an_input_and_server_a_variable() -> None:
    model = load()
    (source,) = model["__inputs"]
    assert source["name"] == "DS_PROMETHEUS" and source["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert "server" in variables
    assert variables["server"]["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert "mcpq_calls_total" in variables["server"]["definition"]
    # Every variable a query uses is defined (or one of Grafana's own).
    for title, expr in queries(model):
        for used in re.findall(r"\$\{?(\w+)", expr):
            assert used in variables or used.startswith("__"), (title, used)


def test_every_query_names_an_exported_metric() -> None:
    exported = exported_metrics()
    assert {"mcpq_calls_total", "mcpq_call_duration_seconds", "mcpq_api_requests_total"} <= set(exported)
    model = load()
    used = set()
    for title, expr in queries(model):
        names = set(re.findall(r"\b(mcpq_[a-z_]+)\b", expr))
        assert names, title
        for name in names:
            base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), name)
            ok = name in exported and exported[name] != "histogram"
            ok = ok or exported.get(base) == "histogram"
            assert ok, f"{title}: {name} is not a metric mcpq exports"
            used.add(base)
    for wanted in (
        "mcpq_queue_wait_seconds",
        "mcpq_breaker_state",
        "mcpq_calls_in_flight",
        "mcpq_pool_sessions",
    ):
        assert wanted in used


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    rules = []
    for index, (_, expr) in enumerate(queries(load())):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"mcpq_dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
