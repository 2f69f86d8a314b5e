"""What the dispatcher tells tickets, as pure builders plus one publishing edge.

Every investigation gets ``dispatched`` (or ``attached``), ``started`` and
exactly one terminal lifecycle event. When it ends without the agent's own
finding (failed, lost, cancelled), a result in the shape of a ``Finding``
(inconclusive, confidence 0, the reason as evidence) follows, so the ticket
that opened with the alert is closed with an explanation rather than silence.
AMQP ``message_id``s are deterministic (investigation + state), so a
consumer can drop the duplicates an at-least-once redelivery may cause.

Resolution: a Job cancelled because its alert group resolved ends
``cancelled`` with reason ``alert_resolved``; its placeholder (sent only when
the agent did not confirm a partial finding of its own) says so and carries
the agent's finding idempotency key, so a consumer that keeps one finding per
key keeps the agent's partial evidence if both arrive. A group that resolves
after its investigation ended gets ``resolved`` (informational, message id
``<investigation>:resolved``, so re-sent resolves are duplicates).
"""

from __future__ import annotations

from datetime import datetime

from schemas import (
    ActionRecord,
    AgentExit,
    AlertBrief,
    Conclusion,
    DeadLetter,
    Evidence,
    FailureReason,
    Finding,
    IncidentEvent,
    LifecycleEvent,
    LifecycleState,
    Phase,
    Severity,
)

from dispatcher.plumbing.amqp import Publisher
from dispatcher.jobs.runtime import JobState, RuntimeEvent
from schemas.lifecycle import MAX_TICKET_ALERTS
from schemas.routing import RESULTS
from schemas.routing import action_key, finding_key, lifecycle_key, routing_word
from dispatcher.intake.tracker import Tracked

STATE_OF = {
    JobState.RUNNING: LifecycleState.STARTED,
    JobState.SUCCEEDED: LifecycleState.SUCCEEDED,
    JobState.FAILED: LifecycleState.FAILED,
    JobState.CANCELLED: LifecycleState.CANCELLED,
    JobState.LOST: LifecycleState.FAILED,
}


def lifecycle_message_id(investigation_id: str, state: LifecycleState, suffix: str = "") -> str:
    return f"{investigation_id}:{state.value}{':' + suffix if suffix else ''}"


ALERT_RESOLVED_MESSAGE = "the alert resolved while the investigation ran; it was stopped before it concluded"


def lifecycle_for(event: RuntimeEvent, tracked: Tracked | None) -> LifecycleEvent:
    """The lifecycle event for a runtime event (pure)."""
    state = STATE_OF[event.state]
    reason = event.reason
    message = event.message
    if state is LifecycleState.CANCELLED and event.message == FailureReason.ALERT_RESOLVED.value:
        reason, message = FailureReason.ALERT_RESOLVED, ALERT_RESOLVED_MESSAGE
    if event.state is JobState.LOST and reason is None:
        reason = FailureReason.JOB_LOST
    if state is LifecycleState.FAILED and reason in (None, FailureReason.AGENT_ERROR,
                                                     FailureReason.BACKOFF_LIMIT_EXCEEDED):
        reason = _exit_reason(event.exit_code) or reason or FailureReason.AGENT_ERROR
    return LifecycleEvent(
        investigation_id=event.investigation_id,
        incident_key=tracked.incident_key if tracked else event.labels.get("agentjobs.dev/incident-key", "unknown"),
        state=state,
        at=event.at,
        job_name=event.job_name,
        phase=tracked.phase if tracked else _phase(event.labels.get("agentjobs.dev/phase")),
        reason=reason if state is LifecycleState.FAILED or reason is FailureReason.ALERT_RESOLVED else None,
        message=message[:4096],
        follows=tracked.follows if tracked else "",
    )


_TITLE_MAX = 255  # Redmine's subject limit; other systems take at least this much
_BRIEF_MAX = 1024
_BRIEF_LABELS = 20  # labels per alert a ticket shows


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def incident_title(event: IncidentEvent, severity: Severity | None = None) -> str:
    """A ticket title (pure): ``[severity] alertname: summary``; untrusted text, cut to 255.
    ``severity``: the incident's, when already known (computing it walks every alert)."""
    severity = severity or event.severity
    first = event.alerts[0]
    summary = (event.common_annotations.get("summary") or first.annotations.get("summary")
               or event.common_annotations.get("description") or first.annotations.get("description") or "")
    where = " ".join(f"{k}={v}" for k, v in sorted(event.group_labels.items()) if k != "alertname")
    name = event.alertname or "alert"
    text = f"[{severity.value}] {name}: {summary}" if summary else f"[{severity.value}] {name} {where}"
    return _cut(text.strip(), _TITLE_MAX)


def alert_briefs(event: IncidentEvent, limit: int = MAX_TICKET_ALERTS) -> tuple[AlertBrief, ...]:
    """The first ``limit`` alerts as a ticket lists them (firing first; pure)."""
    ordered = sorted(event.alerts, key=lambda a: a.status.value != "firing")[:limit]
    return tuple(
        AlertBrief(
            name=_cut(a.name, _BRIEF_MAX), status=a.status.value,
            summary=_cut(a.annotations.get("summary") or a.annotations.get("description") or "", _BRIEF_MAX),
            labels={k[:256]: v[:_BRIEF_MAX] for k, v in sorted(a.labels.items())[:_BRIEF_LABELS]},
            starts_at=a.starts_at,
        )
        for a in ordered
    )


def resolved_after_end(tracked: Tracked, *, at: datetime, event_id: str, alert_count: int,
                       resolved_at: datetime | None = None) -> LifecycleEvent:
    """``resolved`` for an investigation that had already ended (pure; informational for tickets)."""
    when = f" at {resolved_at.isoformat()}" if resolved_at else ""
    return LifecycleEvent(
        investigation_id=tracked.investigation_id, incident_key=tracked.incident_key,
        state=LifecycleState.RESOLVED, at=at, job_name=tracked.job_name, phase=tracked.phase,
        message=f"the alert group resolved{when}, after the investigation had ended",
        event_id=event_id, alert_count=alert_count, follows=tracked.follows,
    )


def dispatched_late(event: RuntimeEvent, tracked: Tracked) -> LifecycleEvent:
    """``dispatched`` for a Job whose launcher died before confirming it (pure): published before
    its ending, under the same message id the launcher would have used."""
    return LifecycleEvent(
        investigation_id=event.investigation_id, incident_key=tracked.incident_key,
        state=LifecycleState.DISPATCHED, at=event.at, job_name=event.job_name, phase=tracked.phase,
        message="reported when the Job ended: the dispatcher that launched it stopped before telling",
        alert_count=len(tracked.fingerprints), follows=tracked.follows,
    )


def _exit_reason(exit_code: int | None) -> FailureReason | None:
    """The agent said why it failed through its exit code (see ``AgentExit``)."""
    try:
        return AgentExit(exit_code).failure if exit_code is not None else None
    except ValueError:
        return None


def _phase(value: str | None) -> Phase | None:
    try:
        return Phase(value) if value else None
    except ValueError:
        return None


def failure_result(lifecycle: LifecycleEvent, *, severity: Severity, domain: str) -> Finding:
    """An inconclusive result that closes the ticket of an investigation without a finding."""
    key = f"{lifecycle.investigation_id}:outcome"
    if lifecycle.reason is FailureReason.ALERT_RESOLVED:
        summary = "The alert resolved while the investigation ran; it was cancelled before it produced a finding"
        key = f"{lifecycle.investigation_id}:finding"  # the agent's key: its partial finding wins
    elif lifecycle.state is LifecycleState.CANCELLED:
        summary = "Investigation cancelled before it produced a finding"
    else:
        reason = lifecycle.reason.value if lifecycle.reason else "unknown"
        summary = f"Investigation failed ({reason}) before it produced a finding"
    return Finding(
        investigation_id=lifecycle.investigation_id,
        incident_key=lifecycle.incident_key,
        idempotency_key=key,
        summary=summary,
        probable_cause="unknown: the investigation did not complete",
        confidence=0.0,
        phase=lifecycle.phase or Phase.SHADOW,
        severity=severity,
        domain=domain,
        conclusion=Conclusion.INCONCLUSIVE,
        evidence=(
            Evidence(source="agentjobs", query=f"job {lifecycle.job_name}", excerpt=lifecycle.message, ok=False),
        ),
        produced_at=lifecycle.at,
        reasoner="dispatcher",
        reason=lifecycle.reason,
    )


class Reporter:
    """Publishes lifecycle events and results to ``agentjobs.results`` with confirms."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def lifecycle(self, event: LifecycleEvent, *, suffix: str = "") -> None:
        await self._publisher.publish_message(
            RESULTS,
            lifecycle_key(event.state),
            event,
            message_id=lifecycle_message_id(event.investigation_id, event.state, suffix),
        )

    async def finding(self, finding: Finding) -> None:
        await self._publisher.publish_message(
            RESULTS, finding_key(finding.severity, finding.domain, finding.phase), finding, message_id=finding.idempotency_key
        )

    async def action(self, record: ActionRecord) -> None:
        """A decision the dispatcher made about an action (an approval accepted or refused)."""
        await self._publisher.publish_message(RESULTS, action_key(record.outcome, record.domain), record,
                                              message_id=f"{record.record_id}:{record.approval_id}"[:512])

    async def dead_letter(self, record: DeadLetter, *, message_id: str) -> None:
        await self._publisher.publish_message(
            RESULTS, f"deadletter.{routing_word(record.reason)}", record, message_id=message_id
        )

