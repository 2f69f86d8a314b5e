"""Shared building blocks for wire messages: the Struct base, enums, field types.

Every wire type is a frozen, kw-only msgspec Struct tagged by ``kind``. New
fields always get a default so older producers stay readable; unknown fields
are ignored (never ``forbid_unknown_fields``) so newer producers stay readable
too. A breaking change gets a new tag instead.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated

import msgspec

# A timezone-aware instant; naive timestamps are ambiguous at 2 AM in a DST change.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
# Probability-like score in [0, 1].
UnitInterval = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0.0)]
# Identifiers we route and look up by; bounded so a hostile payload cannot bloat headers.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class Wire(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Base of every message that crosses a process boundary.

    Subclasses repeat ``kw_only=True``: msgspec applies it per class.
    """


class Phase(enum.StrEnum):
    """Autonomy phase; decides RBAC, Vault policies and allowed actions of the next Job."""

    SHADOW = "shadow"
    READ_ONLY = "read-only"
    LIMITED_REMEDIATION = "limited-remediation"
    AUTONOMOUS = "autonomous"

    @property
    def rank(self) -> int:
        """Position in the promotion ladder (shadow = 0)."""
        return list(Phase).index(self)


class Severity(enum.StrEnum):
    """Incident severity as Alertmanager users label it; orders admission."""

    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"

    @classmethod
    def parse(cls, value: str | None) -> Severity:
        """Map a free-form ``severity`` label to our scale (unknown → warning)."""
        v = (value or "").strip().lower()
        if v in {"critical", "crit", "page", "p1", "emergency", "fatal", "error", "high"}:
            return cls.CRITICAL
        if v in {"info", "informational", "low", "none", "p4", "p5"}:
            return cls.INFO
        return cls.WARNING


class RiskClass(enum.StrEnum):
    """Risk of a proposed action; the phase decides which classes may run."""

    READ = "read"  # observation only, e.g. capture a heap dump
    LOW = "low"  # reversible, bounded blast radius, e.g. rollout restart
    MEDIUM = "medium"  # e.g. scale a deployment, kill an idle-in-transaction session
    HIGH = "high"  # never automatic, e.g. failover, data changes


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (for producers; decisions take time as input)."""
    return datetime.now(UTC)
