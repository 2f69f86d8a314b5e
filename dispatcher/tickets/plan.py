"""A result message → the ticket operations it implies (pure).

Every result may be the first one a ticket sees of its investigation (the ``dispatched`` event
can be redelivered after the finding, or a connector can start mid-investigation), so every plan
carries the ``Opening`` its ticket would be created with; a backend finds the ticket by its
key (the investigation id) and creates it only when there is none. Each note has an ``op_id``
derived from the message (``<investigation>:<state>``, the finding's idempotency key), which a
backend writes into the note and checks before writing: a redelivery, a restart between two
writes, or an outage that hid the answer to a write never writes twice.

A failure result (the dispatcher's, for an investigation without a finding) is a note only: no
record, so closing its ticket asks no verdict of the agent. Shadow findings never become the visible diagnosis: a private note (``shadow = "private"``) or
nothing (``"omit"``); the cause and actions fields stay empty for the operator's own.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas import Finding, LifecycleEvent, LifecycleState, Phase, Severity
from schemas.lifecycle import FailureReason

from dispatcher.tickets import render

ShadowMode = Literal["private", "omit"]
DISPATCHER_REASONER = "dispatcher"  # the failure result of an investigation that produced no finding


class Opening(msgspec.Struct, frozen=True, kw_only=True):
    """What a ticket is created with, when it does not exist yet."""

    key: str  # the investigation id: one ticket per investigation
    subject: str
    description: str
    severity: Severity = Severity.WARNING
    phase: Phase | None = None


class Note(msgspec.Struct, frozen=True, kw_only=True):
    """One update of a ticket, written at most once (``op_id``)."""

    op_id: str
    text: str
    private: bool = False
    cause: str | None = None  # set the root-cause field (None: leave it)
    actions: tuple[str, ...] | None = None  # set the actions field (None: leave it)
    resolve: bool = False  # move the ticket to the backend's "resolved" status
    severity: Severity | None = None  # set the ticket's priority (unless an operator changed it)


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    opening: Opening
    notes: tuple[Note, ...] = ()
    kind: str = ""  # the message's kind and state, for logs and metrics


def _placeholder_opening(investigation_id: str, severity: Severity, what: str, phase: Phase | None) -> Opening:
    return Opening(key=investigation_id, subject=f"[{severity.value}] agentjobs investigation {investigation_id[:16]}",
                   description=f"agentjobs investigation {investigation_id}. {what}", severity=severity, phase=phase)


def for_lifecycle(event: LifecycleEvent) -> Plan:
    """Ticket operations for a lifecycle event."""
    state = event.state
    if state in (LifecycleState.DISPATCHED, LifecycleState.ATTACHED) and event.title:
        opening = Opening(key=event.investigation_id, subject=event.title,
                          description=render.opening_description(event),
                          severity=event.severity or Severity.WARNING, phase=event.phase)
    else:
        opening = _placeholder_opening(event.investigation_id, event.severity or Severity.WARNING,
                                       f"Opened on its '{state.value}' event (the dispatched one was not seen).",
                                       event.phase)
    notes: list[Note] = []
    op_id = f"{event.investigation_id}:{state.value}"
    if state is LifecycleState.ATTACHED:
        op_id += f":{event.event_id or event.alert_count}"
        notes.append(Note(op_id=op_id, text=render.lifecycle_note(event)))
    elif state in (LifecycleState.FAILED, LifecycleState.CANCELLED, LifecycleState.RESOLVED):
        resolved = state is LifecycleState.RESOLVED or event.reason is FailureReason.ALERT_RESOLVED
        notes.append(Note(op_id=op_id, text=render.lifecycle_note(event), resolve=resolved))
    return Plan(opening=opening, notes=tuple(notes), kind=f"lifecycle.{state.value}")


def for_finding(finding: Finding, *, shadow: ShadowMode = "private", scope: str = "") -> Plan:
    """Ticket operations for a finding (the agent's, or the dispatcher's failure result)."""
    is_shadow = finding.phase is Phase.SHADOW
    subject = (f"[{finding.severity.value}] agentjobs investigation {finding.investigation_id[:16]}" if is_shadow
               else f"[{finding.severity.value}] {' '.join(finding.summary.split())}"[:255])
    opening = Opening(key=finding.investigation_id, subject=subject, severity=finding.severity, phase=finding.phase,
                      description=f"agentjobs investigation {finding.investigation_id} (domain "
                                  f"{finding.domain or '?'}); opened on its finding.")
    key = finding.idempotency_key
    if finding.reasoner == DISPATCHER_REASONER:  # no agent finding to judge: a note, no verdict asked
        return Plan(opening=opening, notes=(Note(op_id=key, text=render.finding_note(finding), private=is_shadow),),
                    kind="finding.failure")
    record = Note(op_id=f"{key}:record", private=True,
                  text="The finding as the agent gave it: the operator's closing fields are compared with it.\n"
                       + render.record_text(render.record_of(finding, scope=scope)))
    if is_shadow:
        if shadow == "omit":
            return Plan(opening=opening, kind="finding.shadow")
        note = Note(op_id=key, private=True,
                    text="SHADOW finding (scored against what operators do; not shown as the diagnosis)\n\n"
                         + render.finding_note(finding))
        return Plan(opening=opening, notes=(note, record), kind="finding.shadow")
    note = Note(op_id=key, text=render.finding_note(finding), cause=" ".join(finding.probable_cause.split()),
                actions=render.action_lines(finding), severity=finding.severity)
    return Plan(opening=opening, notes=(note, record), kind="finding")
