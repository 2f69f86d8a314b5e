"""ActionRecord: one per gated action, routed action.<outcome>.<domain>, shown by `tail actions` and the up board."""

from __future__ import annotations

from datetime import timedelta

import msgspec
from rich.console import Console

from agent.publish import action_messages
from dispatcher.cli.board import Board
from dispatcher.cli.ops import STREAMS, render
from schemas import ActionRecord, Finding, Phase, ProposedAction, RiskClass, decode, encode, utcnow
from schemas.actions import records_for
from schemas.routing import RESULTS, action_key

T0 = utcnow()
UNDO = "none (a terminated session cannot be restored; its transaction was rolled back)"


def executed() -> ProposedAction:
    return ProposedAction(action="terminate_backend", target="pid 4242", risk=RiskClass.MEDIUM, executed=True,
                          params={"pid": "4242", "application_name": "orders-batch", "decision": "execute",
                                  "outcome": "executed_verified", "reason": "executed and verified: gone",
                                  "before": "pid 4242 blocked 10 session(s)", "after": "pid 4242 is gone",
                                  "undo": UNDO, "idempotency_key": "inv-1:terminate_backend:abc"})


def proposed() -> ProposedAction:
    return ProposedAction(action="scale_deployment", target="deployment/api in namespace shop",
                          risk=RiskClass.MEDIUM, params={"replicas": "4", "decision": "propose_only",
                                                         "reason": "phase read-only runs nothing automatically"})


def finding(*actions: ProposedAction, phase: Phase = Phase.AUTONOMOUS) -> Finding:
    return Finding(investigation_id="inv-1", incident_key="k" * 32, idempotency_key="f-inv-1", summary="locks",
                   probable_cause="a forgotten transaction", confidence=0.9, phase=phase, domain="database",
                   proposed_actions=actions, produced_at=T0, reasoner="rules")


def test_the_routing_key_is_action_outcome_domain() -> None:
    assert action_key("executed_verified", "database") == "action.executed_verified.database"
    assert action_key("propose_only", "kube.system/*") == "action.propose_only.kube_system"
    assert action_key("refused_kill_switch", "") == "action.refused_kill_switch.unknown"
    assert STREAMS["actions"] == (RESULTS, "action.#")


def test_one_record_per_gated_action_with_what_the_gate_and_the_protocol_wrote() -> None:
    ungated = ProposedAction(action="delete_pod", target="pod/x", risk=RiskClass.LOW)  # never through the gate
    done, waiting = records_for(finding(executed(), proposed(), ungated))

    assert (done.action, done.target, done.decision, done.outcome, done.executed) == (
        "terminate_backend", "pid 4242", "execute", "executed_verified", True)
    assert (done.before, done.after, done.undo) == ("pid 4242 blocked 10 session(s)", "pid 4242 is gone", UNDO)
    assert done.params == {"pid": "4242", "application_name": "orders-batch"}  # recorded fields are fields
    assert done.idempotency_key == "inv-1:terminate_backend:abc"  # the protocol's, as in the Job's ledger
    assert done.record_id == "inv-1:terminate_backend:abc:executed_verified"
    assert (done.phase, done.domain, done.at, done.finding_key) == (Phase.AUTONOMOUS, "database", T0, "f-inv-1")
    # nothing ran: the gate's decision is the outcome; the key is a digest of the same fields
    assert (waiting.decision, waiting.outcome, waiting.executed, waiting.undo) == (
        "propose_only", "propose_only", False, "")
    assert waiting.idempotency_key.startswith("inv-1:scale_deployment:")
    assert records_for(finding(proposed()))[0].idempotency_key == waiting.idempotency_key  # stable


def test_a_record_is_a_tagged_wire_message() -> None:
    [record] = records_for(finding(executed()))
    body = encode(record)
    assert msgspec.json.decode(body)["kind"] == "action_record"
    assert decode(body, ActionRecord) == record


def test_the_messages_are_routed_by_outcome_not_mandatory_and_say_what_they_are_in_headers() -> None:
    messages = action_messages(records_for(finding(executed(), proposed(), phase=Phase.READ_ONLY)),
                               {"job_name": "aj-inv-1"})

    assert [m.routing_key for m in messages] == ["action.executed_verified.database", "action.propose_only.database"]
    assert not any(m.mandatory for m in messages)  # no queue of the topology binds action.#
    assert messages[0].headers == {"job_name": "aj-inv-1", "investigation_id": "inv-1",
                                   "action": "terminate_backend", "target": "pid 4242",
                                   "outcome": "executed_verified", "domain": "database", "executed": True,
                                   "reason": "executed and verified: gone", "undo": UNDO}
    assert messages[0].message_id == "inv-1:terminate_backend:abc:executed_verified"


def test_tail_renders_a_record_decoded_or_known_only_by_its_headers() -> None:
    [record] = records_for(finding(executed()))
    key = "action.executed_verified.database"
    as_record = render("actions", key, msgspec.to_builtins(record), {})
    assert as_record == (f"action   {key}  terminate_backend pid 4242  executed_verified  inv-1  "
                         f"executed and verified: gone  undo: {UNDO}")
    # the generic decoder does not know the kind: tail then holds the body (cut to 1 KiB)
    whole = render("actions", key, {"body": encode(record).decode()}, {})
    assert whole == as_record
    headers = {"investigation_id": "inv-1", "action": "terminate_backend", "target": "pid 4242",
               "outcome": "executed_verified", "domain": "database"}
    cut = render("all", key, {"body": encode(record).decode()[:40]}, headers)
    assert cut == f"action   {key}  terminate_backend pid 4242  executed_verified  inv-1"


def _table(board: Board) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(board.table(T0 + timedelta(seconds=30)))
    return console.export_text()


def test_the_up_board_shows_a_line_per_action_once_whether_carried_or_published() -> None:
    board = Board(Phase.SHADOW)
    f = finding(executed(), proposed())
    lines = board.observe(f, "finding.warning.database")

    assert lines is not None
    first, *actions = lines.split("\n")
    assert first.startswith("  finding     finding.warning.database: locks")
    assert actions == [
        f"  action      action.executed_verified.database: terminate_backend pid 4242 "
        f"(executed and verified: gone; undo: {UNDO[:60]})",
        "  action      action.propose_only.database: scale_deployment deployment/api in namespace shop "
        "(phase read-only runs nothing automatically)",
    ]
    for record in records_for(f):  # the published copies of the same records
        assert board.observe(record, action_key(record.outcome, record.domain)) is None
    text = _table(board)
    assert "↳ terminate_backend" in text and "executed_verified" in text and "propose_only" in text
    assert "actions: executed_verified 1, propose_only 1" in text


def test_a_record_seen_before_its_finding_is_shown_once() -> None:
    board = Board(Phase.SHADOW)
    [record] = records_for(finding(executed()))
    assert board.observe(record, "action.executed_verified.database").startswith("  action      action.executed")
    assert board.observe(finding(executed()), "finding.warning.database").count("\n") == 0
