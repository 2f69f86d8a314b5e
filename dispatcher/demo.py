"""The alert storm ``agentjobs up --demo`` publishes: realistic, deterministic, small.

Several hundred Alertmanager v4 notifications in a handful of groups — mixed
severities, re-sends, alerts joining a group, one group that resolves — as an
on-call engineer would see during an incident at 2 AM.
"""

from __future__ import annotations

import json
import random

GROUPS = (  # alertname, severity, domain, service
    ("PostgresTooManyConnections", "critical", "database", "payments-db"),
    ("HighErrorRate", "critical", "kubernetes", "checkout"),
    ("PodCrashLooping", "warning", "kubernetes", "search"),
    ("HighLatency", "warning", "kubernetes", "catalog"),
    ("DiskAlmostFull", "info", "database", "orders-db"),
)
RESOLVES = "DiskAlmostFull"  # this group fires, then resolves


def _alert(alertname: str, severity: str, domain: str, service: str, instance: int, minute: int, status: str = "firing"):
    return {
        "status": status,
        "labels": {"alertname": alertname, "severity": severity, "domain": domain, "service": service,
                   "namespace": "shop", "instance": f"{service}-{instance}"},
        "annotations": {"summary": f"{alertname} on {service}-{instance}"},
        "startsAt": f"2026-11-26T02:{minute:02d}:00Z",
        "endsAt": "2026-11-26T02:59:00Z" if status == "resolved" else "0001-01-01T00:00:00Z",
        "generatorURL": f"http://prometheus:9090/graph?g0.expr=ALERTS%7Balertname%3D%22{alertname}%22%7D",
        "fingerprint": f"{alertname[:8].lower()}{instance:04d}",
    }


def storm_bodies(notifications_per_group: int = 60, seed: int = 2) -> tuple[list[bytes], int]:
    """(webhook bodies, number of groups), shuffled deterministically."""
    rng = random.Random(seed)
    bodies: list[bytes] = []
    for alertname, severity, domain, service in GROUPS:
        alerts = [_alert(alertname, severity, domain, service, 0, 1)]
        for n in range(notifications_per_group):
            if rng.random() < 0.2:  # another instance joins the group
                alerts.append(_alert(alertname, severity, domain, service, len(alerts), 1 + len(alerts)))
            bodies.append(_webhook(alertname, alerts, "firing"))
        if alertname == RESOLVES:
            resolved = [dict(a, status="resolved", endsAt="2026-11-26T02:59:00Z") for a in alerts]
            bodies.append(_webhook(alertname, resolved, "resolved"))
    firing = [b for b in bodies if b"\"resolved\"" not in b]
    rng.shuffle(firing)
    return firing + [b for b in bodies if b not in firing], len(GROUPS)


def _webhook(alertname: str, alerts: list[dict], status: str) -> bytes:
    return json.dumps({
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{alertname}"}}',
        "status": status,
        "receiver": "agentjobs",
        "groupLabels": {"alertname": alertname},
        "commonLabels": {k: v for k, v in alerts[0]["labels"].items() if k != "instance"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.monitoring:9093",
        "truncatedAlerts": 0,
        "alerts": alerts,
    }).encode()
