"""What a ticket shows and what an operator's closing means (the pure parts of `agentjobs tickets`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dispatcher.intake import senders
from dispatcher.intake.reporting import alert_briefs, incident_title
from dispatcher.plumbing.settings import IdentitySettings
from dispatcher.tickets import plan, render
from dispatcher.tickets.backend import Closed
from dispatcher.tickets.verdicts import verdict
from dispatcher.tickets.webhook import document, idempotency_key, signature
from dispatcher.trust.feedback_classify import TicketFields
from schemas import (
    Alert, AlertStatus, Evidence, FailureReason, Finding, Hypothesis, IncidentEvent, LifecycleEvent, LifecycleState,
    Phase, ProposedAction, RiskClass, Severity, Verdict,
)
from schemas.identity import job_name

T0 = datetime(2026, 12, 4, 2, 0, tzinfo=UTC)
INV = "0123456789abcdef" + "0" * 24


def _event(**labels: str) -> IncidentEvent:
    alert = Alert(status=AlertStatus.FIRING, labels={"alertname": "PgLocks", "severity": "critical", **labels},
                  annotations={"summary": "Lock waits on <b>ledger</b>"}, starts_at=T0)
    return IncidentEvent(source="am", group_key="g", status=AlertStatus.FIRING, alerts=(alert,),
                         group_labels={"alertname": "PgLocks"})


def _finding(phase: Phase = Phase.READ_ONLY, **kw) -> Finding:
    fields = dict(
        investigation_id=INV, incident_key="k" * 32, idempotency_key=f"{INV}:finding",
        summary="Sessions wait on a lock held by pid 4242", probable_cause="lock contention on table ledger",
        confidence=0.8, phase=phase, severity=Severity.CRITICAL, domain="database", reasoner="rules",
        hypotheses=(Hypothesis(cause="lock_contention", statement="pid 4242 blocks 7 sessions", score=0.8,
                               evidence_for=(Evidence(source="postgres", query="blocking chains",
                                                      excerpt="<script>pid 4242</script>"),)),),
        proposed_actions=(ProposedAction(action="terminate_backend", target="pid 4242", risk=RiskClass.MEDIUM),),
    )
    return Finding(**(fields | kw))


def _dispatched(**kw) -> LifecycleEvent:
    event = _event()
    fields = dict(investigation_id=INV, incident_key="k" * 32, state=LifecycleState.DISPATCHED, at=T0,
                  job_name=job_name(INV, "PgLocks"), phase=Phase.READ_ONLY, alert_count=1,
                  title=incident_title(event), severity=Severity.CRITICAL, domain="database", scope="database",
                  alerts=alert_briefs(event))
    return LifecycleEvent(**(fields | kw))


def test_the_title_says_severity_alert_and_summary() -> None:
    assert incident_title(_event()) == "[critical] PgLocks: Lock waits on <b>ledger</b>"


def test_dispatched_opens_the_ticket_with_the_alerts_as_untrusted_text() -> None:
    p = plan.for_lifecycle(_dispatched())
    assert p.opening.key == INV and p.opening.subject.startswith("[critical] PgLocks")
    assert p.notes == ()
    assert "&lt;b&gt;ledger&lt;/b&gt;" in p.opening.description and "<b>" not in p.opening.description


def test_a_finding_sets_cause_and_actions_and_writes_its_record_privately() -> None:
    p = plan.for_finding(_finding(), scope="database")
    note, record = p.notes
    assert not note.private and note.cause == "lock contention on table ledger"
    assert note.actions == ("terminate_backend pid 4242",)
    assert "1. lock_contention (score 0.80)" in note.text and "&lt;script&gt;" in note.text
    assert record.private and render.parse_record(record.text).scope == "database"
    assert {note.op_id, record.op_id} == {f"{INV}:finding", f"{INV}:finding:record"}


@pytest.mark.parametrize("mode", ["private", "omit"])
def test_a_shadow_finding_is_never_the_visible_diagnosis(mode: str) -> None:
    p = plan.for_finding(_finding(Phase.SHADOW), shadow=mode)
    assert all(n.private and n.cause is None and n.actions is None for n in p.notes)
    assert "lock" not in p.opening.subject
    assert (len(p.notes) == 0) if mode == "omit" else (len(p.notes) == 2)


def test_the_dispatchers_failure_result_asks_no_verdict() -> None:
    p = plan.for_finding(_finding(reasoner="dispatcher", probable_cause="unknown: did not complete"))
    assert len(p.notes) == 1 and p.notes[0].cause is None
    assert render.parse_record(p.notes[0].text) is None


def test_resolution_moves_the_ticket_to_resolved_and_failures_are_noted() -> None:
    resolved = plan.for_lifecycle(_dispatched(state=LifecycleState.RESOLVED, title=""))
    cancelled = plan.for_lifecycle(_dispatched(state=LifecycleState.CANCELLED, reason=FailureReason.ALERT_RESOLVED))
    failed = plan.for_lifecycle(_dispatched(state=LifecycleState.FAILED, reason=FailureReason.OOM_KILLED))
    assert resolved.notes[0].resolve and cancelled.notes[0].resolve and not failed.notes[0].resolve
    assert "oom_killed" in failed.notes[0].text
    assert plan.for_lifecycle(_dispatched(state=LifecycleState.STARTED)).notes == ()


def test_markers_round_trip_and_only_ours_parse() -> None:
    text = render.with_marker("hello", f"{INV}:finding")
    assert render.marker_of(text) == f"{INV}:finding"
    assert render.marker_of("hello (agentjobs op ) ") is None


def _closed(finding: Finding, final: TicketFields, **kw) -> Closed:
    fields = dict(ticket="7", key=INV, close_id="redmine-7-31", closed_at=T0, closed_by="Olga Operator",
                  final=final, record=render.record_of(finding, scope="database"))
    return Closed(**(fields | kw))


def test_a_close_without_changes_is_accepted() -> None:
    f = _finding()
    fb = verdict(_closed(f, TicketFields(cause=f.probable_cause, actions=("terminate_backend pid 4242",),
                                         severity="critical")), at=T0)
    assert fb.verdict is Verdict.ACCEPTED and fb.scope == "database" and fb.phase is Phase.READ_ONLY
    assert fb.operator == "Olga Operator"


def test_a_refined_root_cause_is_modified_with_the_field_named() -> None:
    f = _finding()
    fb = verdict(_closed(f, TicketFields(cause="lock contention on table ledger from the nightly batch",
                                         actions=("terminate_backend pid 4242",))), at=T0)
    assert fb.verdict is Verdict.MODIFIED and fb.changed_fields == ("cause",)


def test_the_feedback_id_is_per_closing() -> None:
    f = _finding()
    final = TicketFields(cause=f.probable_cause)
    one, again = verdict(_closed(f, final), at=T0), verdict(_closed(f, final), at=T0)
    reclosed = verdict(_closed(f, final, close_id="redmine-7-40"), at=T0)
    assert one.feedback_id == again.feedback_id != reclosed.feedback_id


def test_no_verdict_without_a_record_or_for_a_shadow_ticket_without_the_operators_cause() -> None:
    f = _finding(Phase.SHADOW)
    assert verdict(_closed(f, TicketFields(), record=None), at=T0) == "no_record"
    assert verdict(_closed(f, TicketFields(cause="  ")), at=T0) == "shadow_without_operator_cause"
    fb = verdict(_closed(f, TicketFields(cause="a full disk on the primary", actions=())), at=T0)
    assert fb.verdict is Verdict.REJECTED and fb.shadow is not None and not fb.shadow.agreed


def test_findings_are_taken_only_from_the_dispatcher_or_that_investigations_agent() -> None:
    ids = IdentitySettings()
    own = f"token-{job_name(INV, 'PgLocks')}-2f1c7e5a-1b2c-4d3e-8f90-0123456789ab"
    other = f"token-{job_name('f' * 40, 'PgLocks')}-2f1c7e5a-1b2c-4d3e-8f90-0123456789ab"
    assert senders.finding_of_investigation(ids, ids.dispatcher, INV) is None
    assert senders.finding_of_investigation(ids, own, INV) is None
    assert senders.finding_of_investigation(ids, other, INV) is not None
    assert senders.finding_of_investigation(ids, ids.operators[0], INV) is not None
    assert senders.finding_of_investigation(ids, "", INV) is not None


def test_ticketing_may_send_feedback_and_nothing_else_trust_listens_to() -> None:
    ids = IdentitySettings()
    assert senders.feedback_sender(ids, ids.ticketing) is None
    assert senders.pin_sender(ids, ids.ticketing) is not None
    assert senders.incident_sender(ids, ids.ticketing) is not None


def test_webhook_documents_are_signed_and_keyed_by_their_operations() -> None:
    p = plan.for_finding(_finding())
    body = document(p)
    assert signature("s3cret", "1700000000", body) != signature("other", "1700000000", body)
    assert signature("s3cret", "1700000000", body).startswith("sha256=")
    assert idempotency_key(p) == idempotency_key(plan.for_finding(_finding()))
    assert idempotency_key(p) != idempotency_key(plan.for_lifecycle(_dispatched()))
