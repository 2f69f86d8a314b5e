"""Pure decisions of lifecycle correctness: follow-ups, resolution reports, what a Job's records say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dispatcher.intake import followups
from dispatcher.intake.followups import Member, Verdict, decide
from dispatcher.intake.reporting import (
    dispatched_late,
    failure_result,
    lifecycle_for,
    lifecycle_message_id,
    resolved_after_end,
)
from dispatcher.intake.tracker import Tracked, Tracker, from_job
from dispatcher.intake.watcher import agent_published
from dispatcher.jobs import jobspec
from dispatcher.jobs.kubernetes import status_of
from dispatcher.jobs.runtime import JobState, RuntimeEvent
from schemas import AgentExit, FailureReason, LifecycleState, Severity, decode, encode
from schemas.lifecycle import LifecycleEvent

T0 = datetime(2026, 12, 4, 5, 0, tzinfo=UTC)


def _chain(*members: tuple[set[str], bool, datetime | None]) -> list[Member]:
    return [Member(investigation_id=f"inv{i}", fingerprints=frozenset(fps), ended=ended, ended_at=at)
            for i, (fps, ended, at) in enumerate(members)]


def test_alerts_seen_by_any_investigation_of_the_chain_are_a_duplicate():
    chain = _chain(({"a"}, True, T0), ({"b"}, True, T0))
    assert decide(chain, {"a", "b"}, now=T0 + timedelta(hours=1), max_follow_ups=3, min_interval=0).verdict \
        is Verdict.DUPLICATE


def test_a_new_alert_after_the_end_starts_the_next_follow_up():
    chain = _chain(({"a"}, True, T0))
    decision = decide(chain, {"a", "b"}, now=T0 + timedelta(seconds=301), max_follow_ups=3, min_interval=300)
    assert decision.verdict is Verdict.FOLLOW_UP and decision.number == 1 and decision.new == {"b"}


def test_a_new_alert_while_the_last_follow_up_runs_attaches_to_it():
    chain = _chain(({"a"}, True, T0), ({"b"}, False, None))
    assert decide(chain, {"c"}, now=T0, max_follow_ups=3, min_interval=0).verdict is Verdict.ATTACH


def test_past_the_follow_up_limit_new_alerts_are_held_with_the_reason():
    chain = _chain(({"a"}, True, T0), ({"b"}, True, T0))
    decision = decide(chain, {"c"}, now=T0 + timedelta(days=1), max_follow_ups=1, min_interval=0)
    assert decision.verdict is Verdict.HELD and "max_follow_ups" in decision.why


def test_too_soon_after_the_previous_ending_new_alerts_are_held_until_later():
    chain = _chain(({"a"}, True, T0))
    early = decide(chain, {"b"}, now=T0 + timedelta(seconds=10), max_follow_ups=3, min_interval=300)
    assert early.verdict is Verdict.HELD and "follow_up_min_interval" in early.why
    later = decide(chain, {"b"}, now=T0 + timedelta(seconds=300), max_follow_ups=3, min_interval=300)
    assert later.verdict is Verdict.FOLLOW_UP


def test_follow_up_ids_and_job_names_are_deterministic_and_distinct():
    first = "a" * 40
    ids = [followups.follow_up_investigation_id(first, n) for n in (1, 2, 1)]
    assert ids[0] == ids[2] != ids[1] and len(ids[0]) == 40
    name = followups.follow_up_job_name("aj-lockwait-" + first[:16], ids[0])
    assert name == "aj-lockwait-" + ids[0][:16]


def test_fingerprints_survive_the_annotation_round_trip_and_stay_bounded():
    value = followups.fingerprints_annotation({"b", "a", "c"})
    assert value == "a,b,c"
    assert followups.fingerprints_from({followups.ANN_FINGERPRINTS: value}) == {"a", "b", "c"}
    storm = followups.fingerprints_annotation(f"{i:016x}" for i in range(10_000))
    assert len(storm) <= followups.MAX_FINGERPRINT_CHARS


def test_a_job_s_labels_and_annotations_rebuild_its_tracked_investigation():
    tracked = from_job(investigation_id="i1", job_name="aj-x-1",
                       labels={jobspec.LABEL_INCIDENT: "k1", jobspec.LABEL_SEVERITY: "critical",
                               jobspec.LABEL_PHASE: "shadow", jobspec.LABEL_DOMAIN: "database"},
                       annotations={followups.ANN_FINGERPRINTS: "f1,f2", followups.ANN_FOLLOWS: "i0"})
    assert (tracked.incident_key, tracked.severity, tracked.domain, tracked.fingerprints, tracked.follows) == \
        ("k1", Severity.CRITICAL, "database", {"f1", "f2"}, "i0")


def test_a_finished_investigation_keeps_its_fingerprints_and_end_time():
    tracker = Tracker()
    tracker.add(Tracked(investigation_id="i", incident_key="k", job_name="j", fingerprints={"a"}))
    tracker.finish("i", at=T0)
    item = tracker.get("i")
    assert item is not None and item.finished and item.fingerprints == {"a"} and item.ended_at == T0


def _event(state: JobState, message: str = "", exit_code: int | None = None) -> RuntimeEvent:
    return RuntimeEvent(job_name="aj-x", investigation_id="i", state=state, at=T0, message=message,
                        exit_code=exit_code)


def test_a_cancel_for_resolution_ends_cancelled_with_reason_alert_resolved():
    tracked = Tracked(investigation_id="i", incident_key="k", job_name="aj-x", follows="i0")
    lifecycle = lifecycle_for(_event(JobState.CANCELLED, "alert_resolved"), tracked)
    assert lifecycle.state is LifecycleState.CANCELLED and lifecycle.reason is FailureReason.ALERT_RESOLVED
    assert "resolved" in lifecycle.message and lifecycle.follows == "i0"
    placeholder = failure_result(lifecycle, severity=Severity.WARNING, domain="")
    assert placeholder.reason is FailureReason.ALERT_RESOLVED and "resolved" in placeholder.summary
    assert placeholder.idempotency_key == "i:finding"  # the agent's own key: its partial finding wins


def test_an_operator_cancel_has_no_reason_and_its_own_placeholder_key():
    lifecycle = lifecycle_for(_event(JobState.CANCELLED, "cancelled"), None)
    assert lifecycle.reason is None
    assert failure_result(lifecycle, severity=Severity.WARNING, domain="").idempotency_key == "i:outcome"


def test_only_exit_codes_that_mean_a_confirmed_finding_suppress_the_placeholder():
    assert agent_published(_event(JobState.CANCELLED, exit_code=AgentExit.PARTIAL))
    assert agent_published(_event(JobState.SUCCEEDED, exit_code=0))
    assert not agent_published(_event(JobState.CANCELLED, exit_code=1))
    assert not agent_published(_event(JobState.CANCELLED, exit_code=None))
    assert not agent_published(_event(JobState.FAILED, exit_code=143))


def test_resolved_after_the_end_is_informational_and_round_trips_on_the_wire():
    tracked = Tracked(investigation_id="i", incident_key="k", job_name="aj-x")
    event = resolved_after_end(tracked, at=T0, event_id="e1", alert_count=2, resolved_at=T0)
    assert event.state is LifecycleState.RESOLVED and not event.state.terminal
    assert decode(encode(event), LifecycleEvent) == event


def test_a_lifecycle_event_without_the_new_fields_still_decodes():
    old = b'{"kind":"lifecycle","investigation_id":"i","incident_key":"k","state":"cancelled","at":"2026-12-04T05:00:00Z"}'
    event = decode(old, LifecycleEvent)
    assert event.reason is None and event.follows == ""


def test_a_kubernetes_job_s_conditions_say_whether_and_when_it_ended():
    base = {"metadata": {"name": "aj-x", "labels": {jobspec.LABEL_INVESTIGATION: "i"},
                         "creationTimestamp": "2026-12-04T05:00:00Z"}}
    running = status_of({**base, "status": {"active": 1}})
    assert running.state is JobState.RUNNING and not running.ended
    done = status_of({**base, "status": {"completionTime": "2026-12-04T05:01:00Z",
                                         "conditions": [{"type": "Complete", "status": "True"}]}})
    assert done.ended and done.state is JobState.SUCCEEDED and done.finished_at == T0 + timedelta(minutes=1)
    reported = status_of({**base, "metadata": {**base["metadata"], "annotations": {jobspec.ANN_REPORTED: "cancelled"}}})
    assert reported.state is JobState.CANCELLED
    assert reported.reported and not done.reported  # only an acknowledged ending counts as told


def test_a_dispatched_reported_late_carries_the_launcher_s_message_id_and_the_job_s_facts():
    tracked = Tracked(investigation_id="i", incident_key="k", job_name="aj-x", fingerprints={"a", "b"},
                      follows="first")
    ending = RuntimeEvent(job_name="aj-x", investigation_id="i", state=JobState.SUCCEEDED, at=T0)
    late = dispatched_late(ending, tracked)
    assert late.state is LifecycleState.DISPATCHED and late.alert_count == 2 and late.follows == "first"
    assert lifecycle_message_id(late.investigation_id, late.state) == "i:dispatched"
    assert "stopped before telling" in late.message
