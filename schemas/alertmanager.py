"""Prometheus Alertmanager webhook payloads (version "4") → ``IncidentEvent``.

Alertmanager can only call webhooks; this is the format it POSTs (see
https://prometheus.io/docs/alerting/latest/configuration/#webhook_config).
Field names are camelCase on the wire; ``endsAt`` of a firing alert is the
zero time ``0001-01-01T00:00:00Z``, which we turn into ``None``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Id, NonNegativeInt, Timestamp
from .incident import MAX_ALERTS, Alert, AlertStatus, Annotations, IncidentEvent, Labels

SUPPORTED_VERSION = "4"
DEFAULT_SOURCE = "alertmanager"


class AlertmanagerAlert(msgspec.Struct, frozen=True, kw_only=True):
    status: AlertStatus
    labels: Labels
    annotations: Annotations = {}
    startsAt: Timestamp
    endsAt: Timestamp | None = None
    generatorURL: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    fingerprint: Annotated[str, msgspec.Meta(max_length=128)] = ""


class AlertmanagerWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """The webhook body as Alertmanager sends it (unknown fields ignored)."""

    version: str
    groupKey: Id
    status: AlertStatus
    alerts: Annotated[tuple[AlertmanagerAlert, ...], msgspec.Meta(min_length=1, max_length=MAX_ALERTS)]
    receiver: Annotated[str, msgspec.Meta(max_length=512)] = ""
    groupLabels: Labels = {}
    commonLabels: Labels = {}
    commonAnnotations: Annotations = {}
    externalURL: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    truncatedAlerts: NonNegativeInt = 0


def _ends_at(alert: AlertmanagerAlert):
    # Alertmanager's "not yet ended" is Go's zero time.
    if alert.endsAt is None or alert.endsAt.year <= 1:
        return None
    return alert.endsAt


def to_incident(
    payload: AlertmanagerWebhook, *, event_id: str, fallback_source: str = DEFAULT_SOURCE
) -> IncidentEvent:
    """Convert a decoded webhook into our incident event (pure)."""
    return IncidentEvent(
        event_id=event_id,
        source=payload.externalURL or fallback_source,
        group_key=payload.groupKey,
        status=payload.status,
        alerts=tuple(
            Alert(
                status=a.status,
                labels=a.labels,
                annotations=a.annotations,
                starts_at=a.startsAt,
                ends_at=_ends_at(a),
                fingerprint=a.fingerprint,
                generator_url=a.generatorURL,
            )
            for a in payload.alerts
        ),
        group_labels=payload.groupLabels,
        common_labels=payload.commonLabels,
        common_annotations=payload.commonAnnotations,
        receiver=payload.receiver,
        external_url=payload.externalURL,
        truncated_alerts=payload.truncatedAlerts,
    )
