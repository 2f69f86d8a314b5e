"""The exporter fallback's pure parts: what counts as a refusal, which series, the tool's shape."""

from __future__ import annotations

from agent.reasoning import exporter
from agent.tools.base import Observation
from schemas import utcnow


def failed(excerpt: str) -> Observation:
    return Observation(tool="postgres", operation="connections", query="", ok=False, at=utcnow(), excerpt=excerpt)


def test_no_slot_no_server_no_login_and_no_answer_in_time_are_refusals():
    for text in ('OperationalError: connection failed: FATAL: remaining connection slots are reserved for '
                 'non-replication superuser connections',
                 "FATAL: sorry, too many clients already",
                 'connection to server at "127.0.0.1", port 5999 failed: Connection refused',
                 'FATAL: password authentication failed for user "v-agent"',
                 "timed out after 5 s"):
        assert exporter.refused(failed(text)), text


def test_an_answer_a_permission_error_or_our_own_budget_is_not_a_refusal():
    assert not exporter.refused(failed("InsufficientPrivilege: permission denied for view pg_stat_activity"))
    assert not exporter.refused(failed("not run: wall-clock budget of 60 s exhausted"))
    assert not exporter.refused(failed("timed out: the investigation's wall-clock budget ran out"))
    ok = Observation(tool="postgres", operation="connections", query="", ok=True, at=utcnow(), data={})
    assert not exporter.refused(ok)


def test_label_values_stay_values_in_promql():
    assert exporter.selector({"server": 'db"} or vector(1) #'}) == '{server="db\\"} or vector(1) #"}'
    assert exporter.selector({}) == ""


def test_the_alerts_identity_labels_are_tried_together_then_alone_then_the_tools_server():
    labels = {"instance": "10.0.0.5:9187", "job": "postgres", "datname": "orders", "alertname": "X"}
    assert exporter.candidates(labels, "db1:5432") == [
        {"instance": "10.0.0.5:9187", "job": "postgres"}, {"instance": "10.0.0.5:9187"}, {"server": "db1:5432"}]
    assert exporter.candidates({"alertname": "X"}, None) == []


def test_the_answer_has_the_postgres_tools_shape():
    settings = [{"metric": {"__name__": "pg_settings_max_connections", "server": "db:5432"}, "value": 10.0},
                {"metric": {"__name__": "pg_settings_superuser_reserved_connections", "server": "db:5432"},
                 "value": 3.0}]
    activity = [{"metric": {"datname": "orders", "state": "idle"}, "value": 5.0},
                {"metric": {"datname": "orders", "state": "idle in transaction"}, "value": 2.0},
                {"metric": {"datname": "postgres", "state": "active"}, "value": 1.0},
                {"metric": {"datname": "postgres", "state": "disabled"}, "value": 0.0}]
    data = exporter.connections_answer(settings, activity, {"server": "db:5432"})
    assert (data["max_connections"], data["superuser_reserved_connections"], data["total"]) == (10, 3, 8)
    assert data["by_state"] == {"idle": 5, "idle in transaction": 2, "active": 1}
    assert data["by_database"] == [{"datname": "orders", "total": 7}, {"datname": "postgres", "total": 1}]
    assert data["by_application"] == [] and data["usage_ratio"] == 0.8


def test_application_labels_become_rows_where_the_exporter_has_them():
    activity = [{"metric": {"state": "idle in transaction", "application_name": "checkout-api"}, "value": 6.0},
                {"metric": {"state": "active", "application_name": "checkout-api"}, "value": 1.0}]
    data = exporter.connections_answer([], activity, {})
    assert data["by_application"] == [{"application_name": "checkout-api", "total": 7, "active": 1, "idle": 0,
                                       "idle_in_transaction": 6}]
