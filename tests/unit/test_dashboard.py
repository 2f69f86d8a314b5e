"""The committed Grafana dashboard: every query parses as PromQL, and it shows what the product promises.

promtool has no "parse this expression" command in every version, so each panel query — with
Grafana's template variables replaced by a duration — becomes a recording rule in a throwaway
file that ``promtool check rules`` parses. Skipped only where promtool is not installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "observability" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's variables ($__rate_interval, $__range, ${x}, $x) stand for a duration in our queries.
TEMPLATE_VARIABLE = re.compile(r"\$\{[^}]+\}|\$__\w+|\$\w+")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
METRIC = re.compile(r"\b(agentjobs_[A-Za-z0-9_]+|up)\b(?!\s*\()")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, also those inside (collapsed) rows."""
    for panel in dashboard()["panels"] if items is None else items:
        yield panel
        yield from panels(panel.get("panels") or [])


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, as written (template variables in place)."""
    return [t["expr"] for p in panels() for t in p.get("targets", []) if t.get("expr")]


def concrete(expr: str) -> str:
    """``expr`` with Grafana's template variables replaced by ``5m`` (what Prometheus would get)."""
    return TEMPLATE_VARIABLE.sub("5m", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (``agentjobs_*`` and ``up``), never label values."""
    without_strings = STRING.sub('""', expr)
    without_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_strings)
    return set(METRIC.findall(without_grouping))


def test_metric_names_are_read_off_queries_not_off_labels() -> None:
    expr = ('sum by (job, queue) (rate(agentjobs_x_total{queue="agentjobs_not_a_metric"}[5m])) '
            '/ on (queue) agentjobs_y or absent(up{job="agentjobs-z"})')
    assert metric_names(expr) == {"agentjobs_x_total", "agentjobs_y", "up"}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian package prometheus)")
def test_every_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": concrete(expr)} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_data_source_is_a_template_variable_every_panel_uses() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 39
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE, panel["title"]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    all_panels = list(panels())
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, p["title"]
        cells |= mine


def test_it_shows_what_the_observability_issue_asks_for() -> None:
    read = set().union(*(metric_names(e) for e in dashboard_exprs()))
    wanted = {
        # intake rate and outcomes, dispatch latency
        "agentjobs_incidents_consumed_total", "agentjobs_bridge_forwarded_total", "agentjobs_job_outcomes_total",
        "agentjobs_dispatch_latency_seconds_bucket",
        # active investigations by class and by phase
        "agentjobs_investigations_active", "agentjobs_investigations_active_by_phase",
        # queue depths and dead letters
        "agentjobs_queue_messages", "agentjobs_queue_consumers", "agentjobs_dead_lettered_total",
        # credential mints, revocations, orphans swept
        "agentjobs_credentials_minted_total", "agentjobs_credentials_revoked_total",
        "agentjobs_credential_revocation_failures_total", "agentjobs_orphan_agent_tokens_revoked_total",
        # phases per scope and modification rates
        "agentjobs_trust_phase", "agentjobs_trust_modification_rate",
        # investigation cost: tokens, USD, CPU, wall
        "agentjobs_investigation_llm_tokens_total", "agentjobs_investigation_llm_cost_usd_total",
        "agentjobs_investigation_cpu_seconds_total", "agentjobs_investigation_wall_seconds_bucket",
        # tickets
        "agentjobs_tickets_results_total", "agentjobs_tickets_backend_errors_total",
    }
    assert wanted - read == set()
    titles = [p["title"] for p in panels()]
    assert "Dispatch latency" in titles
    latency = next(p for p in panels() if p["title"] == "Dispatch latency")
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p99"]
