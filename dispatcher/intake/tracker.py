"""What this dispatcher knows about investigations: enough to attach, route and report.

Kept small per entry (10,000 active investigations must fit comfortably in a
replica's memory): ids, routing facts and the alert fingerprints seen, so a
notification with new alerts produces ``attached`` and a plain re-send
produces nothing. Finished investigations keep their fingerprints (new
ones start a follow-up) and are forgotten after a bounded number, oldest
first. This is memory only: the runtime (409 AlreadyExists, ``status``) and
the Job's annotations remain the authority on "already launched" and "already
ended", and an entry is rebuilt from them after a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime

import msgspec

from schemas import Phase, Severity


class Tracked(msgspec.Struct, kw_only=True):
    investigation_id: str
    incident_key: str
    job_name: str
    class_name: str = "default"
    phase: Phase | None = None
    severity: Severity = Severity.WARNING
    domain: str = ""
    fingerprints: set[str] = msgspec.field(default_factory=set)
    finished: bool = False
    ended_at: datetime | None = None  # when the Job ended, once it did
    dispatch_reported: bool = False  # `dispatched` confirmed by the broker
    follows: str = ""  # a follow-up: the group's first investigation
    resolving: bool = False  # cancelled here because its alert group resolved
    deferred: set[str] = msgspec.field(default_factory=set)  # new alerts already told "no follow-up yet"


class Tracker:
    """Investigations by id; bounded memory of finished ones."""

    def __init__(self, *, keep_finished: int = 10_000) -> None:
        self._items: dict[str, Tracked] = {}
        self._keep_finished = keep_finished
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._items)

    def get(self, investigation_id: str) -> Tracked | None:
        return self._items.get(investigation_id)

    def add(self, item: Tracked) -> Tracked:
        """Remember ``item`` (an existing entry with the same id wins)."""
        return self._items.setdefault(item.investigation_id, item)

    def new_fingerprints(self, investigation_id: str, fingerprints: Iterable[str]) -> set[str]:
        """Record fingerprints; return those not seen before for this investigation."""
        item = self._items[investigation_id]
        new = set(fingerprints) - item.fingerprints
        item.fingerprints |= new
        return new

    def finish(self, investigation_id: str, *, at: datetime | None = None) -> Tracked | None:
        """Mark finished (at ``at``); forget the oldest finished ones beyond the bound."""
        item = self._items.get(investigation_id)
        if item is None or item.finished:
            return item
        item.finished = True
        item.ended_at = item.ended_at or at
        self._finished[investigation_id] = None
        while len(self._finished) > self._keep_finished:
            oldest, _ = self._finished.popitem(last=False)
            self._items.pop(oldest, None)
        return item

    def active(self) -> list[Tracked]:
        return [t for t in self._items.values() if not t.finished]


def from_job(*, investigation_id: str, job_name: str, labels: Mapping[str, str],
             annotations: Mapping[str, str]) -> Tracked:
    """What a Job's labels and annotations say about its investigation (pure): rebuilt after a restart."""
    from dispatcher.intake.followups import ANN_FOLLOWS, fingerprints_from
    from dispatcher.jobs import jobspec

    try:
        severity = Severity(labels.get(jobspec.LABEL_SEVERITY, "warning"))
    except ValueError:
        severity = Severity.WARNING
    try:
        phase = Phase(labels[jobspec.LABEL_PHASE]) if labels.get(jobspec.LABEL_PHASE) else None
    except ValueError:
        phase = None
    return Tracked(
        investigation_id=investigation_id,
        incident_key=labels.get(jobspec.LABEL_INCIDENT, "unknown"),
        job_name=job_name,
        class_name=labels.get(jobspec.LABEL_CLASS, "default"),
        phase=phase,
        severity=severity,
        domain=labels.get(jobspec.LABEL_DOMAIN, ""),
        fingerprints=fingerprints_from(annotations),
        follows=annotations.get(ANN_FOLLOWS, ""),
    )
