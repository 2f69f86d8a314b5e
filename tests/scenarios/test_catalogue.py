"""The suite itself keeps the issue's promises: enough scenarios, across every source, most of them with
alerts no playbook pattern matches, each with a cause and evidence to check (pure)."""

from __future__ import annotations

from tests.scenarios.catalogue import GROUPS, SCENARIOS, WORLDS


def test_there_are_at_least_fifteen_scenarios_with_unique_names():
    names = [s.name for s in SCENARIOS]
    assert len(names) >= 15 and len(set(names)) == len(names)


def test_at_least_half_of_the_alerts_match_no_playbook_pattern():
    unmatched = [s.name for s in SCENARIOS if not s.matches_a_playbook()]
    assert 2 * len(unmatched) >= len(SCENARIOS), unmatched


def test_every_group_has_a_world_and_every_scenario_expects_a_cause_and_evidence():
    assert {s.group for s in SCENARIOS} <= set(WORLDS) == set(GROUPS)
    assert all(s.expected and s.evidence for s in SCENARIOS)


def test_the_alerts_are_alertmanager_webhooks_with_the_rule_expression_in_the_generator_url():
    from agent.reasoning.rules import alert_facts
    from tests.scenarios.harness import Sources

    for s in SCENARIOS:
        facts = alert_facts(s.incident(Sources(tools=_none, facts={"vhost": "v", "server": "127.0.0.1:1"})))
        assert facts.name == s.rule.alertname and facts.expression.startswith(s.rule.expr.split("$")[0])


async def _none() -> list:
    return []
