"""Which PostgreSQL server an investigation queries: the one its alerts' labels name (agent/targets.py).

The configuration travels from ``postgres.targets`` in the dispatcher's settings through the Job's
environment (``AGENTJOBS_POSTGRES__TARGETS``, addresses only) to ``agent.config``; the choice is a
pure function of the incident's labels.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.targets import DEFAULT, PostgresTarget, TargetsError, choose, parse_targets
from dispatcher.jobs.jobspec import postgres_targets_env
from dispatcher.plumbing.settings import SettingsError, load_settings
from schemas import Alert, AlertStatus, IncidentEvent

DEFAULT_TARGET = PostgresTarget(name=DEFAULT, dsn="postgresql://pg-main:5432/orders")
LEDGER = PostgresTarget(name="ledger", dsn="postgresql://pg-ledger:5432/ledger", match={"datname": "ledger"})
LEDGER_EU = PostgresTarget(name="ledger-eu", dsn="postgresql://pg-ledger-eu:5432/ledger",
                           match={"datname": "ledger", "region": "eu"})


def incident(*alert_labels: dict[str, str], common: dict[str, str] | None = None) -> IncidentEvent:
    now = datetime.now(UTC)
    return IncidentEvent(
        source="https://alertmanager.test", group_key="{}:{alertname=\"X\"}", status=AlertStatus.FIRING,
        alerts=tuple(Alert(status=AlertStatus.FIRING, starts_at=now, labels={"alertname": "X", **labels})
                     for labels in alert_labels),
        common_labels=common or {})


def test_without_named_targets_the_default_is_queried_and_nothing_is_said() -> None:
    chosen = choose(incident({"datname": "ledger"}), default=DEFAULT_TARGET, targets=())
    assert chosen.target is DEFAULT_TARGET and chosen.evidence is None


def test_the_target_the_alert_labels_name_is_queried_and_the_finding_says_why() -> None:
    chosen = choose(incident({"datname": "ledger", "severity": "critical"}), default=DEFAULT_TARGET,
                    targets=(LEDGER,))
    assert chosen.name == "ledger" and chosen.dsn == LEDGER.dsn
    assert chosen.evidence is not None and chosen.evidence.ok
    assert "PostgreSQL target ledger (pg-ledger:5432/ledger) selected by the alert's labels datname=ledger" \
        in chosen.evidence.excerpt


def test_the_most_specific_match_wins_then_configuration_order() -> None:
    eu = incident({"datname": "ledger", "region": "eu"})
    assert choose(eu, default=DEFAULT_TARGET, targets=(LEDGER, LEDGER_EU)).name == "ledger-eu"
    us = incident({"datname": "ledger", "region": "us"})
    assert choose(us, default=DEFAULT_TARGET, targets=(LEDGER, LEDGER_EU)).name == "ledger"
    twin = PostgresTarget(name="ledger-twin", dsn="postgresql://pg-twin/ledger", match={"datname": "ledger"})
    assert choose(us, default=DEFAULT_TARGET, targets=(LEDGER, twin)).name == "ledger"


def test_group_labels_count_for_every_alert_and_other_selected_targets_are_named() -> None:
    orders = PostgresTarget(name="orders", dsn="postgresql://pg-orders/orders", match={"datname": "orders"})
    group = incident({"datname": "ledger"}, {"datname": "ledger"}, {"datname": "orders"})
    chosen = choose(group, default=DEFAULT_TARGET, targets=(orders, LEDGER))
    assert chosen.name == "ledger"  # two alerts to one
    assert chosen.evidence is not None and "also select orders (not queried)" in chosen.evidence.excerpt
    by_common = incident({"severity": "page"}, common={"datname": "orders"})
    assert choose(by_common, default=DEFAULT_TARGET, targets=(orders, LEDGER)).name == "orders"


def test_an_alert_naming_an_unknown_target_says_so_and_the_catch_all_default_is_still_asked() -> None:
    chosen = choose(incident({"datname": "payroll"}), default=DEFAULT_TARGET, targets=(LEDGER,))
    assert chosen.target is DEFAULT_TARGET
    assert chosen.evidence is not None and not chosen.evidence.ok
    assert "datname=payroll match no PostgreSQL target (default, ledger)" in chosen.evidence.excerpt
    assert "the default target (pg-main:5432/orders) was queried" in chosen.evidence.excerpt


def test_an_alert_naming_an_unknown_target_queries_no_other_server_when_the_default_has_its_own_match() -> None:
    default = PostgresTarget(name=DEFAULT, dsn=DEFAULT_TARGET.dsn, match={"datname": "orders"})
    chosen = choose(incident({"datname": "payroll"}), default=default, targets=(LEDGER,))
    assert chosen.target is None and chosen.dsn == ""
    assert chosen.evidence is not None and not chosen.evidence.ok
    assert "PostgreSQL was not queried directly (add a target to postgres.targets)" in chosen.evidence.excerpt
    assert choose(incident({"datname": "orders"}), default=default, targets=(LEDGER,)).target is default


def test_an_alert_naming_no_target_label_gets_the_default_without_comment() -> None:
    chosen = choose(incident({"service": "checkout"}), default=DEFAULT_TARGET, targets=(LEDGER,))
    assert chosen.target is DEFAULT_TARGET and chosen.evidence is None
    assert choose(incident({"service": "checkout"}), default=None, targets=(LEDGER,)).target is None


def test_the_dispatchers_settings_reach_the_agent_as_addresses_only(tmp_path: Path) -> None:
    settings = load_settings(None, {
        "AGENTJOBS_POSTGRES__DSN": "postgresql://pg-main:5432/orders",
        "AGENTJOBS_POSTGRES__MATCH": '{"datname": "orders"}',
        "AGENTJOBS_POSTGRES__TARGETS": json.dumps({"ledger": {
            "dsn": "postgresql://someone:secret@pg-ledger:5432/ledger", "match": {"datname": "ledger"},
            "admin_dsn": "postgresql://vault:admin-secret@pg-ledger:5432/ledger"}}),
    })
    env = postgres_targets_env(settings)
    assert "secret" not in json.dumps(env)  # neither the agents' nor the admin's credentials
    loaded = agent_config.load({
        "AGENTJOBS_INVESTIGATION_ID": "inv-1", "AGENTJOBS_PHASE": "shadow", "AGENTJOBS_INPUT_DIR": str(tmp_path),
        "AGENTJOBS_VAULT__ADDR": "http://127.0.0.1:8200", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/",
        "AGENTJOBS_POSTGRES__DSN": "postgresql://pg-main:5432/orders", **env})
    assert loaded.postgres_targets == (PostgresTarget(name="ledger", dsn="postgresql://pg-ledger:5432/ledger",
                                                      match={"datname": "ledger"}),)
    assert loaded.postgres_match == {"datname": "orders"}
    assert loaded.postgres_choice(incident({"datname": "ledger"})).name == "ledger"
    assert loaded.postgres_choice(incident({"datname": "orders"})).dsn == "postgresql://pg-main:5432/orders"


@pytest.mark.parametrize(("raw", "why"), [
    ("[]", "is not a JSON object of targets"),
    ('{"Ledger": {"dsn": "postgresql://h/l", "match": {"d": "l"}}}', "is not a target name"),
    ('{"ledger": {"dsn": "postgresql://h/l"}}', "match is empty"),
    ('{"ledger": {"dsn": "postgresql://h/l", "match": {"d": 1}}}', "match must be an object"),
    ('{"ledger": {"dsn": "postgresql://u:pw@h/l", "match": {"d": "l"}}}', "without a password"),
    ('{"ledger": {"dsn": "mysql://h/l", "match": {"d": "l"}}}', "postgresql://host:port/db"),
    ('{"ledger": {"dsn": "postgresql://h/l", "match": {"d": "l"}, "admin_dsn": "x"}}', "expected"),
])
def test_a_targets_variable_the_agent_cannot_honour_is_a_clear_error(raw: str, why: str) -> None:
    with pytest.raises(TargetsError, match=why):
        parse_targets(raw)


@pytest.mark.parametrize(("targets", "why"), [
    ({"Ledger": {"dsn": "postgresql://h/l", "match": {"d": "l"}}}, "is not a target name"),
    ({"ledger": {"dsn": "postgresql://h/l", "match": {}}}, "match is empty"),
    ({"ledger": {"dsn": "", "match": {"d": "l"}}}, "dsn is empty"),
])
def test_settings_refuse_a_target_no_alert_or_vault_role_could_use(targets: dict[str, object], why: str) -> None:
    with pytest.raises(SettingsError, match=why):
        load_settings(None, {"AGENTJOBS_POSTGRES__TARGETS": json.dumps(targets)})
