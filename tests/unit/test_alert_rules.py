"""The alerting rules for agentjobs itself, checked the way Prometheus will load them.

``promtool check rules`` (syntax, PromQL, templates) and ``promtool test rules`` (the unit tests
in ``agentjobs-rules.test.yml``: series in, alerts out) run on the committed files; the rest
checks what promtool cannot: every alert carries a severity, a summary, a description and a
runbook section that exists, and has a case where it fires and one where it stays quiet.
Skipped only where promtool is not installed (Debian package ``prometheus``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dispatcher.plumbing.metrics import LAUNCH_REJECTED_REASONS

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "k8s" / "observability"
RULES = OBSERVABILITY / "agentjobs-rules.yml"
RULE_TESTS = OBSERVABILITY / "agentjobs-rules.test.yml"
RUNBOOK = OBSERVABILITY / "RUNBOOK.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not found (Debian package prometheus)")


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def alerts() -> dict[str, dict[str, Any]]:
    """Every alerting rule, by alert name."""
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def rule_exprs() -> list[str]:
    """Every PromQL expression of the rules file (for the metric-existence check)."""
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def promtool(*args: str, cwd: Path = OBSERVABILITY) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation gone, spaces to dashes)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@needs_promtool
def test_promtool_accepts_the_rules_file() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_section() -> None:
    anchors = {github_anchor(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity"), name
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook"} <= set(annotations), name
        path, _, anchor = annotations["runbook"].partition("#")
        assert (ROOT / path) == RUNBOOK, name
        assert anchor == f"runbook-{name.lower()}" and anchor in anchors, name
    # and the runbook has no section for an alert that does not exist
    assert anchors == {f"runbook-{name.lower()}" for name in alerts()}


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert set(alerts()) - firing == set()
    assert set(alerts()) - quiet == set()
    assert (firing | quiet) - set(alerts()) == set()  # no test of an alert that is gone


def test_alert_names_and_groups_follow_the_components() -> None:
    assert [g["name"] for g in rule_groups()] == [
        "agentjobs-dispatcher", "agentjobs-trust", "agentjobs-bridge", "agentjobs-tickets"]
    for name in alerts():
        assert re.fullmatch(r"Agentjobs[A-Z][A-Za-z]+", name), name


def test_job_launch_failures_match_exactly_the_runtimes_refusals() -> None:
    # Given the reasons the Kubernetes runtime dead-letters a Job it may not create
    from kubernetes_asyncio.client.exceptions import ApiException

    from dispatcher.jobs.k8s_errors import classify

    def refused(status: int, reason: str, message: str = "no") -> str:
        body = f'{{"kind": "Status", "reason": "{reason}", "message": "{message}", "code": {status}}}'
        exc = ApiException(status=status, reason=reason)
        exc.body = body
        return classify(exc, doing="create Job").reason

    seen = {refused(403, "Forbidden"), refused(422, "Invalid"), refused(400, "BadRequest")}
    # Then the alert's regex names exactly those (and the local runtime's invalid_job)
    expr = alerts()["AgentjobsJobLaunchFailures"]["expr"]
    regex = re.search(r'reason=~"([^"]+)"', expr)
    assert regex is not None
    assert set(regex.group(1).split("|")) == set(LAUNCH_REJECTED_REASONS) == seen
