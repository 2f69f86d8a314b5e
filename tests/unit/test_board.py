"""The picture `agentjobs up` shows, built from the result and phase streams."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console

from dispatcher.cli.board import Board, action_summary
from schemas import (
    ActionRecord,
    FailureReason,
    Finding,
    LifecycleEvent,
    LifecycleState,
    Phase,
    PhaseChanged,
    RiskClass,
    utcnow,
)

T0 = utcnow()


def _event(inv: str, state: LifecycleState, seconds: int = 0, **extra: object) -> LifecycleEvent:
    return LifecycleEvent(investigation_id=inv, incident_key="k" * 32, state=state, at=T0 + timedelta(seconds=seconds),
                          job_name=f"aj-{inv}", phase=Phase.SHADOW, **extra)


def _finding(inv: str, summary: str) -> Finding:
    return Finding(investigation_id=inv, incident_key="k" * 32, idempotency_key=f"f-{inv}", summary=summary,
                   probable_cause="pool exhausted", confidence=0.8, phase=Phase.SHADOW, reasoner="rules")


def _render(board: Board) -> str:
    console = Console(width=140, record=True, color_system=None)
    console.print(board.table(T0 + timedelta(seconds=90)))
    return console.export_text()


def test_an_investigation_moves_from_running_to_recent_outcomes_with_its_finding() -> None:
    board = Board(Phase.SHADOW)
    assert board.observe(_event("a", LifecycleState.DISPATCHED), "lifecycle.dispatched") == \
        "  dispatched  aj-a  (phase shadow)"
    assert board.observe(_event("a", LifecycleState.STARTED, 1), "lifecycle.started") is None
    assert "running" in _render(board)
    line = board.observe(_finding("a", "connections exhausted by app-x"), "finding.critical.database")
    assert line == "  finding     finding.critical.database: connections exhausted by app-x (confidence 0.80)"
    assert board.observe(_event("a", LifecycleState.SUCCEEDED, 30), "lifecycle.succeeded") == "  succeeded   aj-a"
    text = _render(board)
    assert "0 running, 1 ended" in text and "succeeded" in text and "connections exhausted by app-x" in text
    assert "findings → finding.critical.database" in text
    assert board.done(1) and board.outcomes() == {"succeeded": 1}


def test_a_failure_shows_its_reason_and_repeated_events_count_once() -> None:
    board = Board(Phase.SHADOW)
    board.observe(_event("b", LifecycleState.DISPATCHED), "lifecycle.dispatched")
    assert board.observe(_event("b", LifecycleState.DISPATCHED), "lifecycle.dispatched") is None
    failed = _event("b", LifecycleState.FAILED, 5, reason=FailureReason.DEADLINE_EXCEEDED)
    assert board.observe(failed, "lifecycle.failed") == "  failed (deadline_exceeded)  aj-b"
    assert board.observe(failed, "lifecycle.failed") is None
    assert board.outcomes() == {"failed": 1}


def test_done_waits_for_every_dispatched_investigation() -> None:
    board = Board(Phase.SHADOW)
    for inv in ("a", "b"):
        board.observe(_event(inv, LifecycleState.DISPATCHED), "lifecycle.dispatched")
    board.observe(_event("a", LifecycleState.CANCELLED, 3), "lifecycle.cancelled")
    assert not board.done(1)
    board.observe(_event("b", LifecycleState.SUCCEEDED, 3), "lifecycle.succeeded")
    assert board.done(2)


def test_phases_per_scope_replace_the_default_in_the_caption() -> None:
    board = Board(Phase.SHADOW)
    assert "phases: all scopes shadow" in _render(board)
    change = PhaseChanged(scope="database", from_phase=Phase.SHADOW, to_phase=Phase.READ_ONLY, at=T0,
                          reason="promoted")
    assert board.observe(change, "phase.database") == "  phase       database: shadow → read-only (promoted)"
    assert "phases: database=read-only" in _render(board)


UNDO = "none (a terminated session cannot be restored; its transaction was rolled back)"


def _record(outcome: str, *, phase: Phase = Phase.AUTONOMOUS, seconds: int = 0, **extra: str) -> ActionRecord:
    acted = outcome.startswith("executed")
    fields = {"reason": "executed and verified: the diagnostic no longer shows the condition" if acted
              else f"not acting ({outcome})", **extra}
    return ActionRecord(investigation_id="inv", action="terminate_backend", target='pid 4242 on "pg-0:5432"',
                        risk=RiskClass.MEDIUM, decision="execute" if acted else outcome, outcome=outcome,
                        executed=acted, phase=phase, domain="database", at=T0 + timedelta(seconds=seconds),
                        idempotency_key=f"inv:terminate_backend:{outcome}", **fields)


def _executed() -> ActionRecord:
    return _record("executed_verified", undo=UNDO,
                   before="pid 4242 (user app, application orders-batch, idle in transaction) blocked 4 session(s)",
                   after="pid 4242 is gone; 0 session(s) wait on it; of the 4 it blocked, 4 no longer wait")


def test_an_executed_action_says_what_was_seen_before_and_after_and_how_to_undo_it() -> None:
    assert action_summary(_executed()) == (
        'EXECUTED terminate_backend pid 4242 on "pg-0:5432" (phase autonomous, verified)'
        " — before: pid 4242 (user app, application orders-batch, idle in transaction) blocked 4 session(s)"
        " — after: pid 4242 is gone; 0 session(s) wait on it; of the 4 it blocked, 4 no longer wait"
        f" — undo: {UNDO}")
    unverified = _record("executed_not_verified", undo=UNDO, reason="the effect was not observed within 10 s")
    assert action_summary(unverified).startswith('EXECUTED terminate_backend pid 4242 on "pg-0:5432" '
                                                 "(phase autonomous, NOT verified) — after: the effect was not")
    # long texts are cut at a word, never mid-word, and said to be cut
    long = action_summary(_record("executed_verified", undo="kubectl " + "word " * 60))
    assert long.endswith("word…") and "undo: kubectl word" in long


def test_an_action_not_executed_says_its_outcome_and_why() -> None:
    proposed = _record("propose_only", phase=Phase.LIMITED_REMEDIATION,
                       reason="phase limited-remediation runs read, low automatically, not medium-risk actions")
    assert action_summary(proposed) == (
        'not executed (propose_only): terminate_backend pid 4242 on "pg-0:5432" (phase limited-remediation)'
        " — phase limited-remediation runs read, low automatically, not medium-risk actions")


def test_the_table_shows_what_verification_saw_for_an_executed_action() -> None:
    board = Board(Phase.SHADOW)
    board.observe(_executed(), "action.executed_verified.database")
    text = _render(board)
    assert "↳ terminate_backend" in text and "executed_verified" in text
    assert "pid 4242 is gone" in text and "actions: executed_verified 1" in text


def test_a_demo_closes_with_the_actions_executed_first_or_with_how_to_let_the_agent_act() -> None:
    acted = Board(Phase.SHADOW)
    acted.observe(_record("propose_only", seconds=1), "action.propose_only.database")
    acted.observe(_executed(), "action.executed_verified.database")
    lines = acted.actions_summary()
    assert len(lines) == 2 and lines[0].startswith("EXECUTED terminate_backend")
    assert lines[1].startswith("not executed (propose_only)")

    shadow = Board(Phase.SHADOW)
    shadow.observe(_record("record_only", phase=Phase.SHADOW), "action.record_only.database")
    *_, hint = shadow.actions_summary()
    assert hint.startswith("nothing was executed (phase: database shadow): "
                           "`agentjobs phase pin database autonomous --reason demo`")

    off = Board(Phase.SHADOW)
    off.observe(_record("refused_kill_switch"), "action.refused_kill_switch.database")
    *_, hint = off.actions_summary()
    assert hint.startswith("nothing was executed: the kill switch is off")
    assert Board(Phase.SHADOW).actions_summary() == []
