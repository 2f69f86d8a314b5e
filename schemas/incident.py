"""The incident as agentjobs sees it, whatever alert manager sent it.

``IncidentEvent`` is one notification about one alert group: the group's
identity (source + group key), its overall status and the alerts it carries.
Alertmanager webhooks and CloudEvents envelopes are converted into it at the
boundary (see ``alertmanager.py`` and ``cloudevents.py``).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .base import Id, NonNegativeInt, Severity, Timestamp, Wire

# Prometheus' (legacy) label-name grammar, which Alertmanager enforces by default.
LabelName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$", max_length=256)]
# Any text, but no NUL and bounded: values become headers, log fields and Kubernetes labels.
LabelValue = Annotated[str, msgspec.Meta(pattern=r"^[^\x00]*$", max_length=4096)]
Labels = dict[LabelName, LabelValue]
# Annotations are free text (descriptions, runbook URLs); bounded but otherwise opaque.
Annotations = dict[Annotated[str, msgspec.Meta(max_length=256)], Annotated[str, msgspec.Meta(max_length=65536)]]

MAX_ALERTS = 10_000  # per event; Alertmanager truncates with max_alerts long before this


class AlertStatus(enum.StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert inside a group. Text fields are untrusted data, never instructions."""

    status: AlertStatus
    labels: Labels
    annotations: Annotations = {}
    starts_at: Timestamp
    ends_at: Timestamp | None = None  # None while firing (Alertmanager sends year 1)
    fingerprint: Annotated[str, msgspec.Meta(max_length=128)] = ""
    generator_url: Annotated[str, msgspec.Meta(max_length=8192)] = ""

    @property
    def name(self) -> str:
        """The ``alertname`` label, or empty."""
        return self.labels.get("alertname", "")


class IncidentEvent(Wire, tag="incident", kw_only=True):
    """One notification about an alert group (the unit of investigation)."""

    event_id: Annotated[str, msgspec.Meta(max_length=512)] = ""  # unique per notification; filled on intake when absent
    source: Id  # who grouped the alerts, e.g. Alertmanager's externalURL
    group_key: Id  # Alertmanager groupKey or the producer's own grouping key
    status: AlertStatus
    alerts: Annotated[tuple[Alert, ...], msgspec.Meta(min_length=1, max_length=MAX_ALERTS)]
    group_labels: Labels = {}
    common_labels: Labels = {}
    common_annotations: Annotations = {}
    receiver: Annotated[str, msgspec.Meta(max_length=512)] = ""
    external_url: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    truncated_alerts: NonNegativeInt = 0
    received_at: Timestamp | None = None
    # Set by the dispatcher on a follow-up investigation's incident: the id of the group's first
    # investigation (new alerts joined after it ended). Empty for notifications from outside.
    follows: Annotated[str, msgspec.Meta(max_length=128)] = ""

    def label(self, name: str, default: str = "") -> str:
        """A label shared by the group (group, then common, then first alert's)."""
        for labels in (self.group_labels, self.common_labels, self.alerts[0].labels):
            if name in labels:
                return labels[name]
        return default

    @property
    def severity(self) -> Severity:
        """The most severe ``severity`` label among firing alerts (or all, if none fire)."""
        alerts = self.firing_alerts or self.alerts
        levels = [Severity.parse(a.labels.get("severity")) for a in alerts]
        order = list(Severity)
        return min(levels, key=order.index)

    @property
    def firing_alerts(self) -> tuple[Alert, ...]:
        """Alerts of this notification that are still firing."""
        return tuple(a for a in self.alerts if a.status is AlertStatus.FIRING)

    @property
    def alertname(self) -> str:
        """The group's ``alertname``, or the first alert's."""
        return self.label("alertname")
