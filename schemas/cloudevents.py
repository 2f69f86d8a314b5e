"""CloudEvents 1.0 structured-mode JSON envelopes around our incidents.

Producers that already speak CloudEvents can wrap either an Alertmanager
webhook payload or our own ``IncidentEvent`` in ``data`` (or ``data_base64``).
The envelope's ``id`` becomes the incident's ``event_id`` when the inner
payload has none of its own.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Id, Timestamp

SPEC_VERSION = "1.0"
# Types we emit; any type is accepted on intake as long as the data is an incident.
TYPE_INCIDENT = "dev.agentjobs.incident.v1"
TYPE_ALERTMANAGER = "io.prometheus.alertmanager.webhook.v4"


class CloudEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The attributes we read; extension attributes are ignored."""

    specversion: str
    id: Id
    source: Id
    type: Id
    time: Timestamp | None = None
    datacontenttype: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    subject: Annotated[str, msgspec.Meta(max_length=1024)] | None = None
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)  # empty when absent
    data_base64: str | None = None


def is_json_content_type(content_type: str | None) -> bool:
    """True for JSON media types (absent means JSON in structured mode)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"
