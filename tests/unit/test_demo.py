"""The demo's pure parts: how big the connection hog is, the DSNs, and the alerts it publishes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.cli.demo import SPARE_SLOTS, Names, alert_groups, hog_size, interleaved, with_dsn_parts
from schemas.codec import decode_incident
from schemas.identity import identify

NOW = datetime(2026, 12, 3, 2, 0, tzinfo=UTC)
NAMES = Names(suffix="abc123")


@given(max_connections=st.integers(20, 5000), reserved=st.integers(0, 10), in_use=st.integers(0, 200))
def test_the_hog_always_leaves_spare_ordinary_slots(max_connections, reserved, in_use) -> None:
    hog = hog_size(max_connections, reserved, in_use)

    assert hog >= 0
    if hog:
        assert max_connections - reserved - in_use - hog >= SPARE_SLOTS


def test_the_hog_brings_a_default_server_past_the_saturation_the_playbook_looks_for() -> None:
    assert (10 + hog_size(100, 3, 10)) / 100 >= 0.85


def test_dsn_parts_are_replaced_and_quoted() -> None:
    dsn = with_dsn_parts("postgresql://postgres@127.0.0.1:5432/postgres", user="app", password="p@ss/w", database="d")

    assert dsn == "postgresql://app:p%40ss%2Fw@127.0.0.1:5432/d"
    assert with_dsn_parts("postgresql://127.0.0.1/x", database="y") == "postgresql://127.0.0.1/y"


def test_alerts_come_as_alertmanager_groups_with_resends_and_a_joining_alert() -> None:
    groups = alert_groups(NAMES, postgres="127.0.0.1:5432", vhost="agentjobs-demo-abc123", now=NOW)
    bodies = interleaved(groups)

    assert len(groups) == 3 and len(bodies) == sum(len(g) for g in groups)
    # valid Alertmanager v4 webhooks; re-sends and the joining alert keep their group's investigation
    investigations = {identify(decode_incident(b)).investigation_id for b in bodies}
    assert len(investigations) == 3
    connections = [json.loads(b) for b in groups[1]]
    assert len(connections[0]["alerts"]) == 1 and len(connections[-1]["alerts"]) == 2
    backlog = json.loads(groups[2][0])["alerts"][0]["labels"]
    assert backlog["queue"] == "orders.fulfilment" and backlog["vhost"] == "agentjobs-demo-abc123"


def test_without_postgresql_only_the_queue_problem_is_alerted() -> None:
    groups = alert_groups(NAMES, postgres=None, vhost="/", now=NOW)

    assert [json.loads(g[0])["groupLabels"]["alertname"] for g in groups] == ["OrdersQueueBacklog"]
