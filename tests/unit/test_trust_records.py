"""The trust consumer's record of real investigations and its feedback-log entries (pure, no broker).

Feedback counts only for an investigation the dispatcher reported, whose finding came from that
Job's agent or the dispatcher, in the scope and phase recorded; time is the admission time written
into the entry; only the trust identity's entries count; old logs still replay.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import msgspec

from dispatcher.plumbing.settings import IdentitySettings, Settings
from dispatcher.trust import records, snapshots
from dispatcher.trust.records import (
    AdmittedFeedback,
    AdmittedPin,
    FindingSeen,
    InvestigationDispatched,
    InvestigationLedger,
)
from dispatcher.trust.service import TrustService, TrustState
from schemas import OperatorFeedback, Phase, PhasePin, Verdict, encode

IDS = IdentitySettings()
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
JOB = "aj-poolexhausted-0123456789abcdef"
AGENT = f"token-{JOB}-0f8fad5b-d9cb-469f-a165-70867728950e"
OTHER_AGENT = "token-aj-other-0123456789abcdef-0f8fad5b-d9cb-469f-a165-70867728950e"


def _dispatched(inv: str = "inv-1", *, at: datetime = T0, phase: Phase = Phase.SHADOW,
                job: str = JOB, scope: str = "") -> InvestigationDispatched:
    return InvestigationDispatched(investigation_id=inv, job_name=job, phase=phase, scope=scope, dispatched_at=at,
                                   recorded_at=at, sender=IDS.dispatcher)


def _finding(inv: str = "inv-1", *, sender: str = AGENT, at: datetime = T0, domain: str = "database") -> FindingSeen:
    return FindingSeen(investigation_id=inv, domain=domain, phase=Phase.SHADOW, recorded_at=at, sender=sender)


def _fb(n: int, inv: str = "inv-1", *, scope: str = "database", phase: Phase = Phase.SHADOW,
        verdict: Verdict = Verdict.ACCEPTED, at: datetime = T0) -> OperatorFeedback:
    return OperatorFeedback(feedback_id=f"fb-{n}", investigation_id=inv, scope=scope, phase=phase, verdict=verdict,
                            at=at)


def _ledger(**kw) -> InvestigationLedger:
    return InvestigationLedger(IDS, max_age=30 * 86400.0, **kw)


def test_feedback_needs_a_dispatched_investigation_with_a_finding_in_its_scope_and_phase() -> None:
    ledger = _ledger()
    assert ledger.check(_fb(1))[0] == records.UNKNOWN
    ledger.dispatched(_dispatched())
    assert ledger.check(_fb(1))[0] == records.NO_FINDING
    assert ledger.finding(_finding())
    assert ledger.check(_fb(1)) is None
    assert ledger.check(_fb(1, scope="payments"))[0] == records.SCOPE_MISMATCH
    assert ledger.check(_fb(1, phase=Phase.AUTONOMOUS))[0] == records.PHASE_MISMATCH
    assert ledger.check(_fb(1, inv="inv-2"))[0] == records.UNKNOWN


def test_a_finding_counts_only_from_that_jobs_agent_or_the_dispatcher() -> None:
    ledger = _ledger()
    ledger.dispatched(_dispatched())
    assert not ledger.finding(_finding(sender=OTHER_AGENT))  # another Job's agent
    assert not ledger.finding(_finding(sender="guest"))
    assert ledger.check(_fb(1))[0] == records.NO_FINDING
    ledger.dispatched(_dispatched("inv-2", job="aj-two-0123456789abcdef"))
    assert ledger.finding(_finding("inv-2", sender=IDS.dispatcher))  # a failure result
    assert ledger.check(_fb(2, inv="inv-2")) is None


def test_a_finding_before_its_dispatch_is_kept_and_judged_when_the_dispatch_arrives() -> None:
    ledger = _ledger()
    ledger.finding(_finding(sender=OTHER_AGENT))
    ledger.finding(_finding(sender=AGENT))
    assert ledger.check(_fb(1))[0] == records.UNKNOWN  # early findings alone make nothing real
    ledger.dispatched(_dispatched())
    assert ledger.check(_fb(1)) is None
    forged_only = _ledger()
    forged_only.finding(_finding(sender=OTHER_AGENT))
    forged_only.dispatched(_dispatched())
    assert forged_only.check(_fb(1))[0] == records.NO_FINDING


def test_the_lifecycle_scope_wins_over_the_findings_domain() -> None:
    ledger = _ledger()
    ledger.dispatched(_dispatched(scope="team-a"))
    ledger.finding(_finding(domain="database"))
    assert ledger.check(_fb(1, scope="team-a")) is None
    assert ledger.check(_fb(1, scope="database"))[0] == records.SCOPE_MISMATCH


def test_memory_is_bounded_by_age_and_count_and_early_findings_cannot_push_real_ones_out() -> None:
    ledger = _ledger(capacity=3, pending_capacity=2)
    for n in range(4):
        ledger.dispatched(_dispatched(f"inv-{n}", at=T0 + timedelta(minutes=n)))
    assert [ledger.get(f"inv-{n}") is None for n in range(4)] == [True, False, False, False]
    for n in range(100):  # forged findings for made-up ids
        ledger.finding(_finding(f"fake-{n}", sender=OTHER_AGENT, at=T0 + timedelta(minutes=5)))
    assert len(ledger) == 3 and len(ledger.snapshot().pending) == 2
    ledger.dispatched(_dispatched("late", at=T0 + timedelta(days=31)))  # the others are past max_age
    assert len(ledger) == 1 and ledger.snapshot().pending == []


def _state() -> TrustState:
    return TrustState(Settings())


def _message(entry, *, user_id: str, message_id: str = "m") -> SimpleNamespace:
    if isinstance(entry, OperatorFeedback | PhasePin):
        body, kind = encode(entry), type(entry).__struct_config__.tag
    else:
        body, kind = records.encode_entry(entry), records.entry_type(entry)
    return SimpleNamespace(body=body, type=kind, user_id=user_id, message_id=message_id)


def test_decisions_run_on_the_admission_time_never_on_the_senders_at() -> None:
    state = _state()
    state.apply(_dispatched())
    state.apply(_finding())
    backdated = _fb(1, at=T0 - timedelta(days=29))
    state.apply(AdmittedFeedback(feedback=backdated, admitted_at=T0 + timedelta(hours=1), sender=IDS.operators[0]))
    explained = state.ledger.explain("database")
    assert explained.samples == 1 and explained.at == T0 + timedelta(hours=1)
    assert explained.time_in_phase_s == 0.0  # the dwell starts at admission, not 29 days ago
    assert state.last_admitted == T0 + timedelta(hours=1)


def test_only_the_trust_identitys_entries_count_and_old_logs_still_replay() -> None:
    state = _state()
    entries = [_dispatched(), _finding(), AdmittedFeedback(feedback=_fb(1), admitted_at=T0, sender="op")]
    for entry in entries:  # written by someone else: never applied
        state.on_log_entry(_message(entry, user_id=IDS.dispatcher))
    assert state.investigations.get("inv-1") is None and state.ledger.phases() == {}
    assert state.refused_entries == 3
    for entry in entries:
        state.on_log_entry(_message(entry, user_id=IDS.trust))
    assert state.ledger.explain("database").samples == 1
    # A log written before admission times (bare OperatorFeedback / PhasePin): replayed on the sender's time,
    # but not from a component that never wrote the log.
    state.on_log_entry(_message(_fb(2, inv="legacy-1", scope="legacy"), user_id=""))
    state.on_log_entry(_message(_fb(3, inv="legacy-2", scope="legacy"), user_id=IDS.dispatcher))
    assert state.ledger.explain("legacy").samples == 1
    pin = PhasePin(command_id="p", scope="legacy", phase=Phase.READ_ONLY, reason="r", operator="o", at=T0)
    state.on_log_entry(_message(pin, user_id=IDS.trust))
    assert state.ledger.is_pinned("legacy")


def test_a_verdict_in_the_log_for_an_unrecorded_investigation_is_not_tallied() -> None:
    state = _state()
    state.apply(AdmittedFeedback(feedback=_fb(1, inv="never"), admitted_at=T0, sender=IDS.operators[0]))
    assert state.ledger.phases() == {} and state.refused_entries == 1


def test_replay_with_a_snapshot_in_the_middle_is_the_whole_replay() -> None:
    story: list = []
    for n in range(30):
        at = T0 + timedelta(minutes=n)
        story += [_dispatched(f"inv-{n}", at=at), _finding(f"inv-{n}", sender=IDS.dispatcher, at=at),
                  AdmittedFeedback(feedback=_fb(n, inv=f"inv-{n}", verdict=Verdict.MODIFIED if n % 4 == 0
                                                else Verdict.ACCEPTED), admitted_at=at, sender="op")]
    story.append(AdmittedPin(pin=PhasePin(command_id="pin", scope="database", phase=Phase.SHADOW, reason="freeze",
                                          operator="bob", at=T0 - timedelta(days=3)),
                             admitted_at=T0 + timedelta(hours=1), sender=IDS.admins[0]))
    whole = _state()
    for entry in story:
        whole.apply(entry)
    head = _state()
    for entry in story[:40]:
        head.apply(entry)
    wire = snapshots.encode_snapshot(head.snapshot(log_offset=39, log_entry_id="x", applied=40))
    restored = _state()
    restored.restore(msgspec.msgpack.decode(wire, type=snapshots.TrustSnapshot))
    for entry in story[40:]:
        restored.apply(entry)
    assert restored.ledger.snapshot() == whole.ledger.snapshot()
    assert restored.investigations.snapshot() == whole.investigations.snapshot()
    assert restored.decided == whole.decided and restored.last_admitted == whole.last_admitted
    # the pin took effect at its admission time, not at the admin's claimed time
    assert whole.decided["database"].at == T0 + timedelta(hours=1)


def test_the_admission_clock_never_goes_back() -> None:
    now = [T0]
    service = TrustService(Settings(), clock=lambda: now[0])
    service.state.apply(_dispatched(at=T0 + timedelta(hours=2)))
    assert service._admission_time() == T0 + timedelta(hours=2)
    now[0] = T0 + timedelta(hours=3)
    assert service._admission_time() == T0 + timedelta(hours=3)
