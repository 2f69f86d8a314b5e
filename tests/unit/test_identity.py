"""One investigation per firing episode of a group; Job names the API server accepts."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import decode_incident, identify
from schemas.k8snames import is_dns1123_label
from tests.support.payloads import am_alert, dumps, group

T0 = "2026-11-26T02:00:00Z"
GK = '{}/{severity="critical"}:{alertname="HighErrorRate", service="checkout"}'


def _identity(alerts, **kw):
    return identify(decode_incident(dumps(group(alerts, group_key=GK, **kw))))


def test_resent_firing_group_maps_to_the_same_investigation() -> None:
    # Given a group that fired with one alert
    first = _identity([am_alert(starts_at=T0, instance="a")])
    # When Alertmanager re-sends it unchanged (repeat_interval) or as a CloudEvent
    again = _identity([am_alert(starts_at=T0, instance="a")])
    # Then it is the same investigation and the same Job
    assert again == first


def test_alert_joining_a_firing_group_attaches_to_the_same_investigation() -> None:
    first = _identity([am_alert(starts_at=T0, instance="a")])
    joined = _identity(
        [am_alert(starts_at=T0, instance="a"), am_alert(starts_at="2026-11-26T02:07:00Z", instance="b")]
    )
    assert joined.investigation_id == first.investigation_id
    assert joined.job_name == first.job_name


def test_group_firing_again_after_resolve_is_a_new_investigation() -> None:
    first = _identity([am_alert(starts_at=T0, instance="a")])
    resolved = _identity(
        [am_alert(starts_at=T0, instance="a", status="resolved", ends_at="2026-11-26T02:30:00Z")]
    )
    refired = _identity([am_alert(starts_at="2026-11-26T03:10:00Z", instance="a")])

    assert resolved.investigation_id == first.investigation_id  # the resolve finds what it ends
    assert refired.investigation_id != first.investigation_id
    assert refired.incident_key == first.incident_key  # same group, new episode


def test_the_same_instant_written_in_another_zone_is_the_same_investigation() -> None:
    utc = _identity([am_alert(starts_at="2026-11-26T02:00:00Z", instance="a")])
    cet = _identity([am_alert(starts_at="2026-11-26T03:00:00+01:00", instance="a")])
    assert utc.investigation_id == cet.investigation_id


def test_other_groups_and_other_alertmanagers_are_other_investigations() -> None:
    base = _identity([am_alert(starts_at=T0)])
    other_group = identify(
        decode_incident(dumps(group([am_alert(starts_at=T0)], group_key=GK + "x")))
    )
    other_source = _identity([am_alert(starts_at=T0)], externalURL="http://am-eu:9093")
    assert len({base.investigation_id, other_group.investigation_id, other_source.investigation_id}) == 3


def test_job_name_is_readable_and_valid() -> None:
    ident = _identity([am_alert(starts_at=T0, alertname="HighErrorRate")])
    assert ident.job_name.startswith("aj-higherrorrate-")
    assert is_dns1123_label(ident.job_name)
    assert len(ident.investigation_id) == 40


def test_identity_is_stable_across_processes() -> None:
    # hash() is salted per process; identity must not be. Compute it in a fresh interpreter
    # with a different hash seed and compare.
    code = (
        "from schemas import decode_incident, identify;"
        "from tests.support.payloads import SAMPLE_WEBHOOK, dumps;"
        "i = identify(decode_incident(dumps(SAMPLE_WEBHOOK)));"
        "print(i.investigation_id, i.job_name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    ).stdout.split()
    from tests.support.payloads import SAMPLE_WEBHOOK

    here = identify(decode_incident(dumps(SAMPLE_WEBHOOK)))
    assert out == [here.investigation_id, here.job_name]
    # A pinned value: changing the derivation would orphan every running Job.
    assert here.investigation_id == PINNED_SAMPLE_INVESTIGATION_ID


PINNED_SAMPLE_INVESTIGATION_ID = "3f168d32240fcedb48841bd0f9ebb56691b1d4c7"


@settings(max_examples=500, deadline=None)
@given(
    alertname=st.text(max_size=300),
    group_key=st.text(min_size=1, max_size=300),
    source=st.text(min_size=1, max_size=300),
    seconds=st.integers(min_value=0, max_value=4_000_000_000),
)
def test_job_names_are_always_valid_dns1123_labels(alertname, group_key, source, seconds) -> None:
    from datetime import UTC, datetime

    from schemas import Alert, IncidentEvent

    started = datetime.fromtimestamp(seconds, UTC)
    event = IncidentEvent(
        event_id="e",
        source=source,
        group_key=group_key,
        status="firing",
        alerts=(Alert(status="firing", labels={"alertname": alertname}, starts_at=started),),
    )
    ident = identify(event)
    assert len(ident.job_name) <= 63
    assert is_dns1123_label(ident.job_name), ident.job_name
