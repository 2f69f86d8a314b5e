"""Which PostgreSQL server an investigation queries: the one its alerts' labels name (pure).

``postgres.targets`` (``AGENTJOBS_POSTGRES__TARGETS``) maps a target's name to its address and
the labels that select it, e.g. ``{"ledger": {"dsn": "postgresql://pg-ledger:5432/ledger",
"match": {"datname": "ledger"}}}``; ``postgres.dsn`` is the default target, selected by its own
``postgres.match`` when it has one, else by any alert no named target matches. Each target has
its own Vault-issued user (``schemas.vault_paths.database_role_for(phase, target)``).

An alert that names a target — it carries a label some target matches on — that no target
matches gets no query to another server that would only look healthy: the finding says which
labels named nothing (when the default has no ``match`` it is still asked, and the finding says
that too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from schemas import Evidence, IncidentEvent, utcnow
from schemas.vault_paths import check_target_name

DEFAULT = ""  # the name of the default target (postgres.dsn)


class TargetsError(ValueError):
    """``AGENTJOBS_POSTGRES__TARGETS`` / ``__MATCH`` cannot be read; the message says why."""


@dataclass(frozen=True)
class PostgresTarget:
    name: str  # DEFAULT for postgres.dsn
    dsn: str  # without credentials: the agent inserts its Vault-issued user
    match: Mapping[str, str] = field(default_factory=dict)  # labels that select it (all of them)

    @property
    def label(self) -> str:
        return self.name or "default"

    def selected_by(self, labels: Mapping[str, str]) -> bool:
        return bool(self.match) and all(labels.get(k) == v for k, v in self.match.items())


@dataclass(frozen=True)
class Choice:
    """The target an investigation queries (None: none directly) and what the finding says of it."""

    target: PostgresTarget | None
    evidence: Evidence | None = None

    @property
    def name(self) -> str:
        return self.target.name if self.target is not None else DEFAULT

    @property
    def dsn(self) -> str:
        return self.target.dsn if self.target is not None else ""


def parse_match(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise TargetsError(f"{where}: match must be an object of label names to values")
    return dict(raw)


def parse_targets(raw: str) -> tuple[PostgresTarget, ...]:
    """``{name: {"dsn": ..., "match": {label: value}}}`` in configuration order (pure)."""
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TargetsError(f"{raw[:80]!r} is not a JSON object of targets")
    found = []
    for name, spec in data.items():
        try:
            check_target_name(name)
        except ValueError as exc:
            raise TargetsError(str(exc)) from None
        if not isinstance(spec, dict) or not isinstance(spec.get("dsn"), str) or set(spec) - {"dsn", "match"}:
            raise TargetsError(f"target {name}: expected {{\"dsn\": ..., \"match\": {{...}}}}")
        match = parse_match(spec.get("match", {}), f"target {name}")
        if not match:
            raise TargetsError(f"target {name}: match is empty (no alert could select it)")
        found.append(PostgresTarget(name=name, dsn=_address(spec["dsn"], f"target {name}"), match=match))
    return tuple(found)


def _address(dsn: str, where: str) -> str:
    try:
        parts = urlsplit(dsn)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or parts.password:
        raise TargetsError(f"{where}: dsn must be a postgresql://host:port/db URL without a password")
    return dsn


def label_sets(incident: IncidentEvent) -> list[dict[str, str]]:
    """Each (firing, else every) alert's labels over the group's shared ones."""
    shared = {**incident.common_labels, **incident.group_labels}
    return [{**shared, **alert.labels} for alert in (incident.firing_alerts or incident.alerts)]


def choose(incident: IncidentEvent, *, default: PostgresTarget | None,
           targets: Sequence[PostgresTarget]) -> Choice:
    """The target the incident's labels select (pure).

    Most specific first (more ``match`` labels), then the one more alerts select, then
    configuration order (the default first). Without named targets: the default, as always.
    """
    if default is not None and not default.dsn:
        default = None
    if not targets:
        return Choice(default)
    candidates = [t for t in (default, *targets) if t is not None]
    sets = label_sets(incident)
    scored = [(len(t.match), sum(t.selected_by(s) for s in sets), -i, t) for i, t in enumerate(candidates)]
    picked = max((row for row in scored if row[1]), default=None, key=lambda row: row[:3])
    if picked is not None:
        target = picked[3]
        said = ", ".join(f"{k}={v}" for k, v in target.match.items())
        others = sorted({t.label for _, n, _, t in scored if n and t is not target})
        also = f"; alerts of this group also select {', '.join(others)} (not queried)" if others else ""
        return Choice(target, _evidence(f"PostgreSQL target {target.label} ({_where(target.dsn)}) selected by "
                                        f"the alert's labels {said}{also}", ok=True))
    keys = {k for t in candidates for k in t.match}
    named = sorted({f"{k}={s[k]}" for s in sets for k in keys if k in s})
    if not named:
        return Choice(default)
    known = ", ".join(t.label for t in candidates)
    if default is not None and not default.match:
        return Choice(default, _evidence(
            f"the alert's labels {', '.join(named)} match no PostgreSQL target ({known}); the default target "
            f"({_where(default.dsn)}) was queried", ok=False))
    return Choice(None, _evidence(
        f"the alert's labels {', '.join(named)} match no PostgreSQL target ({known}); PostgreSQL was not queried "
        "directly (add a target to postgres.targets)", ok=False))


def _where(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port or 5432}/{parts.path.lstrip('/') or '-'}"


def _evidence(text: str, *, ok: bool) -> Evidence:
    return Evidence(source="postgres", query="select target by alert labels", excerpt=text, at=utcnow(), ok=ok)
