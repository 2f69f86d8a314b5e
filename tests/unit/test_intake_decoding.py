"""Every accepted intake format decodes to the same incident; everything else is
rejected with a precise reason and never an unhandled exception."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import AlertStatus, DecodeError, IncidentEvent, Severity, decode_incident, encode
from tests.support.payloads import SAMPLE_WEBHOOK, cloudevent, dumps, webhook


def test_alertmanager_v4_webhook_becomes_an_incident_with_every_alert() -> None:
    event = decode_incident(dumps(SAMPLE_WEBHOOK))

    assert event.source == "http://alertmanager.monitoring.svc:9093"
    assert event.group_key == SAMPLE_WEBHOOK["groupKey"]
    assert event.status is AlertStatus.FIRING
    assert event.receiver == "agentjobs"
    assert [a.status for a in event.alerts] == ["firing", "firing", "resolved"]
    first = event.alerts[0]
    assert first.starts_at == datetime(2026, 11, 26, 2, 4, 31, 123000, tzinfo=UTC)
    assert first.ends_at is None  # Alertmanager's zero time means "not ended"
    assert first.fingerprint == "3b1e5f9d6c2a7e41"
    assert first.generator_url.startswith("http://prometheus.monitoring.svc:9090/graph?g0.expr=")
    assert event.alerts[2].ends_at == datetime(2026, 11, 26, 2, 3, 12, tzinfo=UTC)
    assert event.common_labels["domain"] == "database"
    assert event.severity is Severity.CRITICAL
    assert event.alertname == "PostgresTooManyConnections"
    assert event.event_id.startswith("am-")


def test_same_webhook_bytes_get_the_same_event_id_and_different_bytes_another() -> None:
    body = dumps(SAMPLE_WEBHOOK)
    assert decode_incident(body).event_id == decode_incident(body).event_id
    assert decode_incident(body).event_id != decode_incident(dumps(webhook(receiver="x"))).event_id


def test_own_incident_event_round_trips_unchanged() -> None:
    event = decode_incident(dumps(SAMPLE_WEBHOOK))

    again = decode_incident(encode(event))

    assert again == event
    assert json.loads(encode(event))["kind"] == "incident"


def test_cloudevent_envelope_around_a_webhook_takes_the_envelope_id() -> None:
    event = decode_incident(dumps(cloudevent(SAMPLE_WEBHOOK, id="ce-42")))

    direct = decode_incident(dumps(SAMPLE_WEBHOOK))
    assert event.event_id == "ce-42"
    assert msgspec.structs.replace(event, event_id=direct.event_id) == direct


def test_cloudevent_envelope_around_our_event_and_as_base64() -> None:
    own = encode(decode_incident(dumps(SAMPLE_WEBHOOK)))
    plain = decode_incident(dumps(cloudevent(json.loads(own), type="dev.agentjobs.incident.v1")))
    b64 = decode_incident(
        dumps(
            {
                **cloudevent(None),
                "data": None,
                "data_base64": base64.b64encode(dumps(SAMPLE_WEBHOOK)).decode(),
            }
        )
    )

    assert plain.group_key == b64.group_key == SAMPLE_WEBHOOK["groupKey"]
    assert b64.event_id == "ce-0001"


def test_cloudevent_without_alertmanager_external_url_uses_its_source() -> None:
    event = decode_incident(dumps(cloudevent(webhook(externalURL=""))))
    assert event.source == "/monitoring/alertmanager"


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    payload = webhook(newFieldFromAlertmanager5={"x": 1})
    payload["alerts"][0]["somethingNew"] = True
    assert isinstance(decode_incident(dumps(payload)), IncidentEvent)


def _without(field: str) -> dict:
    payload = webhook()
    del payload[field]
    return payload


def _alert_with(**changes) -> dict:
    payload = webhook()
    payload["alerts"][0].update(changes)
    return payload


def _labels(**labels) -> dict:
    payload = webhook()
    payload["alerts"][0]["labels"] = {"alertname": "X", **labels}
    return payload


def _raw_labels(labels: dict) -> dict:
    payload = webhook()
    payload["alerts"][0]["labels"] = labels
    return payload


MALFORMED: list[tuple[str, bytes, str, str]] = [
    # (case, body, expected reason, a fragment the message must contain)
    ("empty body", b"", "empty_body", "empty"),
    ("whitespace only", b"  \n\t ", "empty_body", "empty"),
    ("invalid json", b'{"version": "4",', "invalid_json", "truncated"),
    ("trailing garbage", dumps(SAMPLE_WEBHOOK) + b"}}", "invalid_json", "trailing"),
    ("top-level array", b"[1, 2, 3]", "not_an_object", "object"),
    ("top-level string", b'"hello"', "not_an_object", "object"),
    ("10 MB body", b'{"x": "' + b"a" * (10 * 1024 * 1024) + b'"}', "too_large", "limit is 1048576"),
    ("non-UTF-8 bytes", b'{"version": "4", "receiver": "\xff\xfe"}', "not_utf8", "UTF-8"),
    ("latin-1 encoded", '{"kind": "incident", "source": "café"}'.encode("latin-1"), "not_utf8", "UTF-8"),
    ("no format markers", b'{"hello": "world"}', "unknown_format", "Alertmanager"),
    ("unknown kind", b'{"kind": "bogus"}', "unknown_kind", "'bogus'"),
    ("another wire kind", b'{"kind": "finding"}', "unknown_kind", "not an incident"),
    ("kind of wrong type", b'{"kind": ["incident"]}', "unknown_kind", "['incident']"),
    ("alertmanager version 3", dumps(webhook(version="3")), "unsupported_version", "'3'"),
    ("version is a number", dumps(webhook(version=4)), "unsupported_version", "4"),
    ("missing groupKey", dumps(_without("groupKey")), "missing_field", "groupKey"),
    ("missing alerts", dumps(_without("alerts")), "missing_field", "alerts"),
    ("empty alerts", dumps(webhook(alerts=[])), "invalid_field", "$.alerts"),
    ("alerts not a list", dumps(webhook(alerts={"a": 1})), "invalid_field", "$.alerts"),
    ("unknown group status", dumps(webhook(status="burning")), "invalid_field", "$.status"),
    ("labels not an object", dumps(_alert_with(labels=["a"])), "invalid_field", "$.alerts[0].labels"),
    ("label value not a string", dumps(_labels(severity=3)), "invalid_field", "$.alerts[0].labels"),
    ("startsAt not a time", dumps(_alert_with(startsAt="yesterday")), "invalid_field", "startsAt"),
    ("startsAt without zone", dumps(_alert_with(startsAt="2026-11-26T02:04:31")), "invalid_field", "startsAt"),
    ("label name with space", dumps(_raw_labels({"alert name": "X"})), "invalid_label", "labels"),
    ("label name with unicode", dumps(_raw_labels({"région": "eu"})), "invalid_label", "labels"),
    ("label name with ../", dumps(_raw_labels({"../../etc": "x"})), "invalid_label", "labels"),
    ("label value with NUL", dumps(_labels(instance="pg-0\u0000")), "invalid_label", "labels"),
    ("label value 5000 chars", dumps(_labels(instance="x" * 5000)), "invalid_field", "labels"),
    ("negative truncatedAlerts", dumps(webhook(truncatedAlerts=-1)), "invalid_field", "truncatedAlerts"),
    (
        "resolved group with firing alerts",
        dumps(webhook(status="resolved")),
        "inconsistent_status",
        "2 alert(s) are firing",
    ),
    ("deeply nested json", b'{"version": "4", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too_deep", "deep"),
    ("cloudevent 0.3", dumps(cloudevent(SAMPLE_WEBHOOK, specversion="0.3")), "unsupported_specversion", "0.3"),
    ("cloudevent without id", dumps({k: v for k, v in cloudevent(SAMPLE_WEBHOOK).items() if k != "id"}), "missing_field", "id"),
    ("cloudevent xml data", dumps(cloudevent(SAMPLE_WEBHOOK, datacontenttype="application/xml")), "unsupported_content_type", "xml"),
    ("cloudevent without data", dumps({**cloudevent(None), "data": None}), "missing_data", "no data"),
    ("cloudevent bad base64", dumps({**cloudevent(None), "data": None, "data_base64": "%%%"}), "invalid_base64", "base64"),
    ("cloudevent wrapping cloudevent", dumps(cloudevent(cloudevent(SAMPLE_WEBHOOK))), "nested_cloudevent", "another"),
    ("cloudevent data not an object", dumps(cloudevent([1, 2])), "not_an_object", "object"),
    ("own event with bad confidence-like type", b'{"kind": "incident", "source": 1}', "invalid_field", "$.source"),
]


@pytest.mark.parametrize(
    ("body", "reason", "fragment"),
    [pytest.param(body, reason, fragment, id=case) for case, body, reason, fragment in MALFORMED],
)
def test_malformed_input_is_rejected_with_a_precise_reason(body: bytes, reason: str, fragment: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_incident(body)

    assert caught.value.reason == reason, caught.value.message
    assert fragment in caught.value.message


def test_there_are_at_least_twenty_distinct_malformed_cases() -> None:
    assert len(MALFORMED) >= 20
    assert len({reason for _, _, reason, _ in MALFORMED}) >= 15


@pytest.mark.parametrize(
    "value", ["pg 0 primary", "Zürich-1", "../../etc/passwd", "数据库", "a" * 300, "-leading", "trailing."]
)
def test_label_values_with_spaces_unicode_or_paths_are_accepted_as_data(value: str) -> None:
    # Prometheus label values are arbitrary text; they are sanitised where they become
    # Kubernetes names or labels (see test_k8snames), not rejected at intake.
    event = decode_incident(dumps(_labels(instance=value)))
    assert event.alerts[0].labels["instance"] == value


def test_invalid_utf8_in_a_field_nobody_reads_is_still_reported_as_such() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_incident(b'{"receiver": "\xff"}')
    assert caught.value.reason == "not_utf8"
