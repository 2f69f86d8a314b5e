"""A ticket an operator closed → the ``OperatorFeedback`` it implies, or why none (pure).

The verdict compares the ticket's final fields with the connector's record of the finding
(``feedback_classify``): unchanged → ``accepted``; a refined or reworded cause, changed
actions or severity → ``modified`` with the fields' names; a replaced cause → ``rejected``.
Scope and phase come from our record; trust checks them against its own again.

No verdict is asked where there is nothing the operator judged: no record (the dispatcher's
failure result, shadow findings with ``shadow = "omit"``, a ticket not ours), or a shadow
ticket closed without the operator's own cause (the operator never saw the agent's). Each
closing has its own feedback id (``close_id``): reading the same closed ticket again counts
once, and a ticket reopened and closed with other fields is a correction (trust keeps the last).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from schemas import Finding, OperatorFeedback, Phase, ProposedAction, RiskClass

from dispatcher.tickets.backend import Closed
from dispatcher.tickets.render import FindingRecord
from dispatcher.trust.feedback_classify import TicketFields, feedback_from_ticket


def feedback_id(closed: Closed, record: FindingRecord) -> str:
    digest = hashlib.sha256(f"{closed.close_id}\x00{record.idempotency_key}".encode()).hexdigest()
    return f"ticket-{digest[:32]}"


def finding_of(record: FindingRecord) -> Finding:
    """The parts of the finding a verdict is judged on, as a ``Finding``."""
    actions = tuple(ProposedAction(action=line.split(" ", 1)[0], target=line.split(" ", 1)[1] if " " in line else "",
                                   risk=RiskClass.READ) for line in record.actions)
    return Finding(investigation_id=record.investigation_id, incident_key=record.investigation_id,
                   idempotency_key=record.idempotency_key, summary=record.summary,
                   probable_cause=record.probable_cause, confidence=record.confidence, phase=record.phase,
                   severity=record.severity, domain=record.domain, proposed_actions=actions)


def verdict(closed: Closed, *, at: datetime) -> OperatorFeedback | str:
    """The feedback to publish for ``closed``, or a short reason why there is none."""
    record = closed.record
    if record is None:
        return "no_record"
    if record.investigation_id != closed.key:
        return "record_of_another_investigation"
    final = closed.final
    if record.phase is Phase.SHADOW:
        if not (final.cause or "").strip():
            return "shadow_without_operator_cause"
        # the operator never saw the agent's severity or actions: only what they wrote counts
        final = TicketFields(cause=final.cause, actions=final.actions or None, summary=final.summary)
    return feedback_from_ticket(finding_of(record), final, at=at, scope=record.scope or record.domain,
                                operator=closed.closed_by[:512], feedback_id=feedback_id(closed, record),
                                comment=f"from ticket {closed.ticket}, closed at {closed.closed_at.isoformat()}")
