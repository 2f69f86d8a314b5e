"""Which investigation an incident notification belongs to, and its Job's name.

An investigation is (source, group key, earliest ``startsAt`` of the firing
alerts). Re-sends of a still-firing group and alerts joining it keep that
instant, so they map to the same investigation; a group that fires again
after it resolved has new alerts with a later ``startsAt``, so it is a new
investigation. A resolved notification (no firing alerts) maps to the
investigation its alerts started, via their earliest ``startsAt``.

The Job name is derived from the key with SHA-256 — never ``hash()``, which
is salted per process — so every dispatcher replica computes the same name
and the API server's 409 AlreadyExists enforces exactly one Job.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import msgspec

from .incident import IncidentEvent
from .k8snames import DNS1123_LABEL_MAX, dns_slug

JOB_PREFIX = "aj"
_HASH_CHARS = 16  # 64 bits: a collision among live investigations is not a practical concern


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """The identity of one investigation."""

    incident_key: str  # 32 hex of (source, group key): the same for every investigation of the group
    investigation_key: str  # readable (source, group key, first firing instant)
    investigation_id: str  # 40 hex of investigation_key: fits labels, Vault metadata, tickets
    job_name: str  # DNS-1123 label, <= 63 chars
    started_at: datetime  # earliest firing startsAt (UTC)


def _instant(dt: datetime) -> str:
    # Fixed format and zone so the key never depends on how a producer wrote the time.
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_firing_instant(event: IncidentEvent) -> datetime:
    """Earliest ``startsAt`` of the firing alerts (of all alerts if none fire)."""
    alerts = event.firing_alerts or event.alerts
    return min(a.starts_at for a in alerts).astimezone(UTC)


def incident_key(event: IncidentEvent) -> str:
    """Key of the alert group across all its investigations (32 hex chars)."""
    return _digest(f"{event.source}\x1f{event.group_key}")[:32]


def job_name(investigation_id: str, alertname: str = "") -> str:
    """``aj-<alertname slug>-<16 hex>``: readable in ``kubectl get jobs``, unique by the hash."""
    digest = investigation_id[:_HASH_CHARS]
    room = DNS1123_LABEL_MAX - len(JOB_PREFIX) - len(digest) - 2
    slug = dns_slug(alertname, room)
    return f"{JOB_PREFIX}-{slug}-{digest}" if slug else f"{JOB_PREFIX}-{digest}"


def identify(event: IncidentEvent) -> Identity:
    """The investigation ``event`` belongs to (pure, stable across processes and versions)."""
    started = first_firing_instant(event)
    key = f"{event.source}\x1f{event.group_key}\x1f{_instant(started)}"
    inv_id = _digest(key)[:40]
    return Identity(
        incident_key=incident_key(event),
        investigation_key=key,
        investigation_id=inv_id,
        job_name=job_name(inv_id, event.alertname),
        started_at=started,
    )
