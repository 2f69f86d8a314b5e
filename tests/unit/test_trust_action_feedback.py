"""Per-action operator feedback (issue 18): a verdict may name the action it is about (pure, no broker).

Trust refuses a verdict naming an action — or one execution of it — that the investigation's
finding did not propose (``unknown_action``), counts accepted ones per action in the window
(``Explanation.actions``, shown by ``agentjobs phase explain``) and in
``agentjobs_action_feedback_total``; a harmful flag on an action demotes exactly as any harmful flag.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import msgspec

from dispatcher.plumbing.settings import IdentitySettings, Settings, TrustSettings
from dispatcher.trust import records, snapshots
from dispatcher.trust.policy import ActionTally, TrustLedger, action_tallies
from dispatcher.trust.records import (
    ActionSeen,
    AdmittedFeedback,
    FindingSeen,
    InvestigationDispatched,
    InvestigationLedger,
    action_refusal,
    actions_of,
)
from dispatcher.trust.service import TrustMetrics, TrustState
from schemas import (
    Finding,
    OperatorFeedback,
    Phase,
    PhaseChanged,
    ProposedAction,
    RiskClass,
    Verdict,
    decode,
    encode,
)
from schemas.actions import records_for
from schemas.export import render

IDS = IdentitySettings()
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
JOB = "aj-poolexhausted-0123456789abcdef"
LIMITED = Phase.LIMITED_REMEDIATION
POLICY = TrustSettings(policy_version="test-1", window=50, min_samples=20, promote_threshold=0.2,
                       demote_threshold=0.4, confidence_z=1.96, min_dwell=30 * 86400, cooldown=0,
                       max_age=7 * 86400.0, harmful_demotes_to=Phase.READ_ONLY)

TERMINATE = ActionSeen(action="terminate_backend", key="inv-1:terminate_backend:abc", executed=True)
RESTART = ActionSeen(action="restart_deployment", key="inv-1:restart_deployment:def")


def _fb(n: int, inv: str = "inv-1", *, verdict: Verdict = Verdict.ACCEPTED, phase: Phase = Phase.SHADOW,
        action: str = "", action_key: str = "", harmful: bool = False, at: datetime = T0) -> OperatorFeedback:
    return OperatorFeedback(feedback_id=f"fb-{n}", investigation_id=inv, scope="database", phase=phase,
                            verdict=verdict, at=at, action=action, action_key=action_key, harmful=harmful)


def _finding(**kw) -> Finding:
    gated = ProposedAction(action="terminate_backend", target="pid 4242 on database pg-0", risk=RiskClass.MEDIUM,
                           executed=True, params={"pid": "4242", "decision": "execute",
                                                  "outcome": "executed_verified",
                                                  "idempotency_key": "inv-1:terminate_backend:k1"})
    proposed = ProposedAction(action="restart_deployment", target="deployment/web in namespace shop",
                              risk=RiskClass.LOW, params={"deployment": "web", "decision": "propose_only"})
    ungated = ProposedAction(action="delete_pod", target="pod/web-1 in namespace shop", risk=RiskClass.LOW)
    return Finding(investigation_id="inv-1", incident_key="k", idempotency_key="inv-1:finding", summary="s",
                   probable_cause="c", confidence=0.8, phase=LIMITED, domain="database",
                   proposed_actions=(gated, proposed, ungated), produced_at=T0, **kw)


# --- the wire ---------------------------------------------------------------------------------

def test_the_action_fields_are_an_optional_backward_compatible_addition() -> None:
    old = (b'{"kind": "feedback", "feedback_id": "f", "investigation_id": "i", "scope": "db", "phase": "shadow",'
           b' "verdict": "accepted", "at": "2026-11-01T09:00:00Z"}')
    fb = decode(old, OperatorFeedback)
    assert (fb.action, fb.action_key) == ("", "")
    named = _fb(1, action="terminate_backend", action_key="k")
    assert decode(encode(named), OperatorFeedback) == named
    schema = msgspec.json.decode(render()["feedback.schema.json"])
    props = schema["$defs"]["OperatorFeedback"]["properties"]
    assert props["action"] == {"default": "", "maxLength": 512, "type": "string"}
    assert "action" not in schema["$defs"]["OperatorFeedback"]["required"]


# --- what a finding proposed ------------------------------------------------------------------

def test_actions_of_a_finding_carry_the_keys_of_their_action_records() -> None:
    finding = _finding()
    seen = actions_of(finding)
    assert [(a.action, a.executed) for a in seen] == [("terminate_backend", True), ("restart_deployment", False),
                                                      ("delete_pod", False)]
    records = {r.action: r.idempotency_key for r in records_for(finding)}
    assert seen[0].key == "inv-1:terminate_backend:k1" == records["terminate_backend"]
    assert seen[1].key == records["restart_deployment"]  # a digest: the gate never handed it to an executor
    assert seen[2].key == ""  # never gated: no record


def test_a_verdict_may_name_only_an_action_the_finding_proposed() -> None:
    proposed = (TERMINATE, RESTART)
    assert action_refusal(_fb(1), proposed) is None  # the finding as a whole
    assert action_refusal(_fb(1, action="terminate_backend"), proposed) is None
    assert action_refusal(_fb(1, action="restart_deployment", action_key=RESTART.key), proposed) is None
    reason, detail = action_refusal(_fb(1, action="scale_deployment"), proposed)
    assert reason == records.UNKNOWN_ACTION
    assert "did not propose 'scale_deployment'" in detail and "restart_deployment, terminate_backend" in detail
    reason, detail = action_refusal(_fb(1, action="terminate_backend", action_key=RESTART.key), proposed)
    assert reason == records.UNKNOWN_ACTION and "no 'terminate_backend' with key" in detail
    reason, detail = action_refusal(_fb(1, action_key=TERMINATE.key), proposed)
    assert reason == records.UNKNOWN_ACTION and "without action" in detail
    assert "no action" in action_refusal(_fb(1, action="delete_pod"), ())[1]


def _ledger_with(actions: tuple[ActionSeen, ...], *, early: bool = False) -> InvestigationLedger:
    ledger = InvestigationLedger(IDS, max_age=30 * 86400.0)
    dispatched = InvestigationDispatched(investigation_id="inv-1", job_name=JOB, phase=Phase.SHADOW,
                                         dispatched_at=T0, recorded_at=T0, sender=IDS.dispatcher)
    finding = FindingSeen(investigation_id="inv-1", domain="database", phase=Phase.SHADOW, recorded_at=T0,
                          sender=IDS.dispatcher, actions=actions)
    for entry in ([finding, dispatched] if early else [dispatched, finding]):
        (ledger.finding if isinstance(entry, FindingSeen) else ledger.dispatched)(entry)
    return ledger


def test_the_ledger_checks_the_named_action_also_for_a_finding_seen_before_its_dispatch() -> None:
    for early in (False, True):
        ledger = _ledger_with((TERMINATE,), early=early)
        assert ledger.check(_fb(1, action="terminate_backend")) is None
        assert ledger.check(_fb(1, action="delete_pod"))[0] == records.UNKNOWN_ACTION
        restored = InvestigationLedger(IDS, max_age=30 * 86400.0)
        restored.restore(msgspec.msgpack.decode(msgspec.msgpack.encode(ledger.snapshot()),
                                                type=records.InvestigationsSnapshot))
        assert restored.check(_fb(1, action="terminate_backend")) is None
        assert restored.snapshot() == ledger.snapshot()


def test_an_old_finding_entry_without_actions_still_decodes_and_names_none() -> None:
    old = (b'{"kind": "trust_finding", "investigation_id": "inv-1", "domain": "database", "phase": "shadow",'
           b' "recorded_at": "2026-11-01T09:00:00Z", "sender": "dispatcher"}')
    entry = records.decode_entry(old)
    assert isinstance(entry, FindingSeen) and entry.actions == ()
    ledger = _ledger_with(entry.actions)
    assert ledger.check(_fb(1)) is None
    assert ledger.check(_fb(1, action="terminate_backend"))[0] == records.UNKNOWN_ACTION


# --- counting per action ----------------------------------------------------------------------

def test_action_tallies_count_verdicts_overrides_and_harm_per_action() -> None:
    notes = [("terminate_backend", True, True, False), ("terminate_backend", True, True, True),
             ("delete_pod", False, False, False), ("terminate_backend", False, False, False)]
    assert action_tallies(notes) == (
        ActionTally(action="delete_pod", feedbacks=1, modifications=0, overridden=0, harmful=0),
        ActionTally(action="terminate_backend", feedbacks=3, modifications=2, overridden=2, harmful=1))
    assert action_tallies([]) == ()


def _limited() -> TrustLedger:
    ledger = TrustLedger(POLICY)
    ledger.apply_phase_changed(PhaseChanged(scope="database", from_phase=None, to_phase=LIMITED, at=T0,
                                            reason="promoted", operator="auto"))
    return ledger


def test_the_window_counts_verdicts_per_action_and_phase_explain_says_so() -> None:
    ledger = _limited()
    story = [_fb(1, "i1", verdict=Verdict.ACTION_OVERRIDDEN, action="terminate_backend"),
             _fb(2, "i2", verdict=Verdict.ACCEPTED, action="terminate_backend"),
             _fb(3, "i3", verdict=Verdict.ACTION_OVERRIDDEN, action="delete_pod"),
             _fb(4, "i4", verdict=Verdict.ACCEPTED)]
    for i, fb in enumerate(story):
        assert ledger.apply_feedback(msgspec.structs.replace(fb, phase=LIMITED, at=T0 + timedelta(minutes=i + 1))) \
            is None
    e = ledger.explain("database")
    assert e.samples == 4 and e.modifications == 2  # per-action verdicts count like any other
    assert e.actions == (
        ActionTally(action="delete_pod", feedbacks=1, modifications=1, overridden=1, harmful=0),
        ActionTally(action="terminate_backend", feedbacks=2, modifications=1, overridden=1, harmful=0))
    assert "action terminate_backend: 2 verdict(s) in the window, 1 overridden, 0 harmful, 1 modified" in e.notes
    # a correction on the same investigation replaces the verdict, and its action count with it
    ledger.apply_feedback(_fb(5, "i1", verdict=Verdict.ACCEPTED, phase=LIMITED, at=T0 + timedelta(minutes=9)))
    assert ledger.explain("database").actions == (
        ActionTally(action="delete_pod", feedbacks=1, modifications=1, overridden=1, harmful=0),
        ActionTally(action="terminate_backend", feedbacks=1, modifications=0, overridden=0, harmful=0))
    # and a snapshot keeps them exactly
    restored = TrustLedger.restore(POLICY, msgspec.msgpack.decode(msgspec.msgpack.encode(ledger.snapshot()),
                                                                  type=type(ledger.snapshot())))
    assert restored.snapshot() == ledger.snapshot() and restored.explain("database") == ledger.explain("database")
    # old feedback leaves the window, and its action count with it
    late = _fb(6, "i9", phase=LIMITED, at=T0 + timedelta(days=8))
    ledger.apply_feedback(late)
    assert ledger.explain("database").actions == ()


def test_a_harmful_verdict_on_an_executed_action_demotes_as_any_harmful_flag() -> None:
    named, plain = _limited(), _limited()
    by_action = named.apply_feedback(_fb(1, action="terminate_backend", harmful=True,
                                         verdict=Verdict.ACTION_OVERRIDDEN, phase=LIMITED))
    as_before = plain.apply_feedback(_fb(1, harmful=True, verdict=Verdict.ACTION_OVERRIDDEN, phase=LIMITED))
    assert by_action == as_before
    assert (by_action.from_phase, by_action.to_phase, by_action.reason) == (LIMITED, Phase.READ_ONLY,
                                                                             "harmful_action")


# --- the consumer's state: refusal on replay, the counter ---------------------------------------

def _counter(metrics: TrustMetrics) -> dict[tuple[str, str, str], float]:
    return {(s.labels["action"], s.labels["verdict"], s.labels["harmful"]): s.value
            for m in metrics.action_feedback.collect() for s in m.samples if s.name.endswith("_total")}


def test_the_consumer_state_counts_accepted_action_verdicts_once_and_refuses_unknown_actions() -> None:
    metrics = TrustMetrics()
    state = TrustState(Settings(), metrics)
    state.apply(InvestigationDispatched(investigation_id="inv-1", job_name=JOB, phase=Phase.SHADOW,
                                        dispatched_at=T0, recorded_at=T0, sender=IDS.dispatcher))
    state.apply(FindingSeen(investigation_id="inv-1", domain="database", phase=Phase.SHADOW, recorded_at=T0,
                            sender=IDS.dispatcher, actions=(TERMINATE,)))
    good = _fb(1, verdict=Verdict.ACTION_OVERRIDDEN, action="terminate_backend", action_key=TERMINATE.key)
    for _ in range(2):  # a redelivery counts once
        state.apply(AdmittedFeedback(feedback=good, admitted_at=T0, sender=IDS.operators[0]))
    forged = _fb(2, action="failover_database")
    state.apply(AdmittedFeedback(feedback=forged, admitted_at=T0, sender=IDS.operators[0]))
    assert state.refused_entries == 1
    assert _counter(metrics) == {("terminate_backend", "action_overridden", "false"): 1.0}
    assert state.ledger.explain("database").actions == (
        ActionTally(action="terminate_backend", feedbacks=1, modifications=1, overridden=1, harmful=0),)
    # the snapshot carries it (a new format: older snapshots are replayed past)
    wire = snapshots.encode_snapshot(state.snapshot(log_offset=3, log_entry_id="x", applied=4))
    snap = msgspec.msgpack.decode(wire, type=snapshots.TrustSnapshot)
    assert snap.format == 3 and snap.investigations.investigations[0].actions == (TERMINATE,)
    assert snapshots.unusable(msgspec.structs.replace(snap, format=2), Settings().trust, "x") is not None


def test_the_consumer_records_the_actions_a_finding_proposed() -> None:
    from dispatcher.trust.service import TrustService

    service = TrustService(Settings())
    service.state.apply(InvestigationDispatched(investigation_id="inv-1", job_name=JOB, phase=LIMITED,
                                                dispatched_at=T0, recorded_at=T0, sender=IDS.dispatcher))
    delivery = SimpleNamespace(routing_key="finding.critical.database", user_id=IDS.dispatcher,
                               body=encode(_finding()))
    entry = service._result_entry(delivery)
    assert isinstance(entry, FindingSeen)
    assert [a.action for a in entry.actions] == ["terminate_backend", "restart_deployment", "delete_pod"]
    assert entry.actions[0] == ActionSeen(action="terminate_backend", key="inv-1:terminate_backend:k1",
                                          executed=True)
