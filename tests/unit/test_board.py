"""The picture `agentjobs up` shows, built from the result and phase streams."""

from __future__ import annotations

from datetime import timedelta

from rich.console import Console

from dispatcher.cli.board import Board
from schemas import FailureReason, Finding, LifecycleEvent, LifecycleState, Phase, PhaseChanged, utcnow

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
