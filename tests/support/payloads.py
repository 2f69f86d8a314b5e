"""Builders for realistic intake payloads, shared by tests and benchmarks.

``SAMPLE_WEBHOOK`` is a hand-written Alertmanager v4 webhook (tests/data) in
the documented format; the builders vary it without hiding what changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE_WEBHOOK: dict[str, Any] = json.loads((DATA / "alertmanager_v4.json").read_text())
ZERO_TIME = "0001-01-01T00:00:00Z"


def webhook(**overrides: Any) -> dict[str, Any]:
    """A deep copy of the sample webhook with top-level fields replaced."""
    payload = copy.deepcopy(SAMPLE_WEBHOOK)
    payload.update(overrides)
    return payload


def am_alert(
    *,
    starts_at: str,
    status: str = "firing",
    ends_at: str = ZERO_TIME,
    alertname: str = "PostgresTooManyConnections",
    **labels: str,
) -> dict[str, Any]:
    """One Alertmanager alert object."""
    all_labels = {"alertname": alertname, "severity": "warning", **labels}
    return {
        "status": status,
        "labels": all_labels,
        "annotations": {"summary": f"{alertname} on {labels.get('instance', 'somewhere')}"},
        "startsAt": starts_at,
        "endsAt": ends_at,
        "generatorURL": "http://prometheus:9090/graph?g0.expr=up",
        "fingerprint": hashlib.sha256(repr(sorted(all_labels.items())).encode()).hexdigest()[:16],
    }


def group(alerts: list[dict[str, Any]], *, group_key: str = '{}:{alertname="X"}', **overrides: Any) -> dict[str, Any]:
    """A webhook for one group, with status and common labels derived as Alertmanager does."""
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    common = dict(alerts[0]["labels"]) if alerts else {}
    for a in alerts[1:]:
        common = {k: v for k, v in common.items() if a["labels"].get(k) == v}
    fields = {
        "groupKey": group_key,
        "status": status,
        "alerts": alerts,
        "groupLabels": {k: v for k, v in common.items() if k == "alertname"},
        "commonLabels": common,
        "commonAnnotations": {},
        **overrides,
    }
    return webhook(**fields)


def cloudevent(data: Any, **attrs: Any) -> dict[str, Any]:
    """A CloudEvents 1.0 structured-mode envelope around ``data``."""
    return {
        "specversion": "1.0",
        "id": "ce-0001",
        "source": "/monitoring/alertmanager",
        "type": "io.prometheus.alertmanager.webhook.v4",
        "time": "2026-11-26T02:05:00Z",
        "datacontenttype": "application/json",
        "data": data,
        **attrs,
    }


def dumps(payload: Any) -> bytes:
    """JSON bytes of a payload."""
    return json.dumps(payload).encode()


def storm(*, groups: int, notifications: int, seed: int = 0, severities: tuple[str, ...] = ("critical", "warning", "info")) -> list[bytes]:
    """An alert storm: ``notifications`` webhook bodies over ``groups`` firing groups, shuffled.

    Each group starts with one alert; later notifications re-send it unchanged, add alerts that
    joined the group (starting later), or arrive wrapped in a CloudEvent — all of which belong
    to the group's one investigation.
    """
    import random

    rng = random.Random(seed)
    bodies: list[bytes] = []
    for g in range(groups):
        severity = severities[g % len(severities)]
        alertname = f"Storm{g % 7}"
        key = f'{{}}/{{severity="{severity}"}}:{{alertname="{alertname}", service="svc-{g}"}}'
        alerts = [am_alert(starts_at="2026-11-26T02:00:00Z", alertname=alertname, severity=severity,
                           service=f"svc-{g}", instance="pod-0")]
        per_group = notifications // groups + (1 if g < notifications % groups else 0)
        for n in range(per_group):
            kind = rng.random()
            if n > 0 and kind < 0.3:
                alerts = alerts + [am_alert(starts_at=f"2026-11-26T02:{n % 60:02d}:30Z", alertname=alertname,
                                            severity=severity, service=f"svc-{g}", instance=f"pod-{n}")]
            payload = group(list(alerts), group_key=key)
            if 0.3 <= kind < 0.45:
                payload = cloudevent(payload, id=f"ce-{g}-{n}")
            bodies.append(dumps(payload))
    rng.shuffle(bodies)
    return bodies
