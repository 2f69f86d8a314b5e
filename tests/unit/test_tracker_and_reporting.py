"""What the dispatcher remembers, and what it tells tickets when a Job ends."""

from __future__ import annotations

from datetime import UTC, datetime

from dispatcher.intake.deadletters import Delivery, explain, headers_for, record_for
from dispatcher.intake.reporting import failure_result, lifecycle_for
from schemas.routing import finding_key, routing_word
from dispatcher.jobs.runtime import JobState, RuntimeEvent
from dispatcher.intake.tracker import Tracked, Tracker
from schemas import Conclusion, ErrorKind, FailureReason, LifecycleState, Phase, Severity

AT = datetime(2026, 11, 26, 2, 30, tzinfo=UTC)


def _tracked(i: str) -> Tracked:
    return Tracked(investigation_id=i, incident_key="k", job_name=f"aj-{i}", phase=Phase.SHADOW,
                   severity=Severity.CRITICAL, domain="database")


def test_new_fingerprints_are_reported_once() -> None:
    tracker = Tracker()
    tracker.add(_tracked("a"))
    assert tracker.new_fingerprints("a", ["f1", "f2"]) == {"f1", "f2"}
    assert tracker.new_fingerprints("a", ["f1", "f2"]) == set()
    assert tracker.new_fingerprints("a", ["f2", "f3"]) == {"f3"}


def test_finished_investigations_are_forgotten_oldest_first_beyond_the_bound() -> None:
    tracker = Tracker(keep_finished=2)
    for i in "abcd":
        tracker.add(_tracked(i))
    tracker.add(_tracked("active"))
    for i in "abcd":
        tracker.finish(i)
    assert tracker.get("a") is None and tracker.get("b") is None
    assert tracker.get("c").finished and tracker.get("d").finished
    assert [t.investigation_id for t in tracker.active()] == ["active"]


def test_oom_becomes_a_failed_lifecycle_and_an_inconclusive_result() -> None:
    event = RuntimeEvent(job_name="aj-a", investigation_id="a", state=JobState.FAILED, at=AT,
                         reason=FailureReason.OOM_KILLED, message="OOMKilled (exit 137)")
    lifecycle = lifecycle_for(event, _tracked("a"))
    result = failure_result(lifecycle, severity=Severity.CRITICAL, domain="database")

    assert lifecycle.state is LifecycleState.FAILED and lifecycle.reason is FailureReason.OOM_KILLED
    assert result.conclusion is Conclusion.INCONCLUSIVE and result.confidence == 0.0
    assert "oom_killed" in result.summary
    assert result.evidence[0].excerpt == "OOMKilled (exit 137)"
    assert finding_key(result.severity, result.domain, Phase.READ_ONLY) == "finding.critical.database"


def test_shadow_findings_are_routed_away_from_operators_severity_queues() -> None:
    assert finding_key(Severity.CRITICAL, "database", Phase.SHADOW) == "finding.shadow.database"
    assert finding_key(Severity.CRITICAL, "database", Phase.AUTONOMOUS) == "finding.critical.database"


def test_a_vanished_job_is_reported_as_failed_job_lost() -> None:
    event = RuntimeEvent(job_name="aj-a", investigation_id="a", state=JobState.LOST, at=AT)
    lifecycle = lifecycle_for(event, None)
    assert lifecycle.state is LifecycleState.FAILED and lifecycle.reason is FailureReason.JOB_LOST


def test_routing_words_cannot_inject_wildcards_or_levels() -> None:
    assert routing_word("db.eu-1") == "db_eu-1"
    assert routing_word("#") == "unknown"
    assert routing_word("*.x") == "x"


def test_our_dead_letter_record_travels_in_the_headers() -> None:
    delivery = Delivery(b"{oops", routing_key="alertmanager.shop", message_id="m1")
    record = record_for(delivery, reason="invalid_json", message="JSON is malformed", kind=ErrorKind.PERMANENT,
                        at=AT, component="dispatcher")
    again = explain(Delivery(b"{oops", headers=headers_for(record)), at=AT)
    assert again == record


def test_broker_dead_letters_are_explained_from_x_death() -> None:
    delivery = Delivery(
        b'{"version": "4"}',
        routing_key="alertmanager.shop",
        headers={"x-death": [{"reason": "delivery_limit", "queue": "agentjobs.incidents", "count": 21,
                              "exchange": "agentjobs.incidents", "routing-keys": ["alertmanager.shop"]}]},
    )
    record = explain(delivery, at=AT)
    assert record.error_kind is ErrorKind.DELIVERY_LIMIT
    assert record.reason == "delivery_limit"
    assert "delivered too often" in record.message
    assert record.original_routing_key == "alertmanager.shop"
    assert record.deliveries == 21


def test_the_agents_exit_code_says_why_it_failed() -> None:
    def failed(code: int, reason: FailureReason) -> FailureReason | None:
        event = RuntimeEvent(job_name="aj-a", investigation_id="a", state=JobState.FAILED, at=AT,
                             reason=reason, exit_code=code)
        return lifecycle_for(event, None).reason

    assert failed(3, FailureReason.BACKOFF_LIMIT_EXCEEDED) is FailureReason.CREDENTIALS_UNAVAILABLE
    assert failed(4, FailureReason.AGENT_ERROR) is FailureReason.NO_FINDING
    assert failed(1, FailureReason.BACKOFF_LIMIT_EXCEEDED) is FailureReason.BACKOFF_LIMIT_EXCEEDED
    assert failed(137, FailureReason.OOM_KILLED) is FailureReason.OOM_KILLED
