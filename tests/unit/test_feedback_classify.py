"""Ticket → feedback: cosmetic edits are accepted, changed fields are named, a new cause rejects."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dispatcher.trust.feedback_classify import (
    CauseChange,
    TicketFields,
    classify,
    compare_cause,
    feedback_from_ticket,
)
from dispatcher.plumbing.settings import TrustSettings
from dispatcher.trust.policy import TrustLedger
from schemas import (
    Conclusion,
    Finding,
    OperatorFeedback,
    Phase,
    ProposedAction,
    RiskClass,
    Severity,
    Verdict,
    decode,
    encode,
)

CLOSED = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


def finding(**overrides) -> Finding:
    fields: dict[str, Any] = {
        "investigation_id": "inv-42",
        "incident_key": "db-conn-exhaustion",
        "idempotency_key": "inv-42:1",
        "summary": "Connection pool exhausted on orders-db",
        "probable_cause": (
            "Idle-in-transaction sessions from the billing worker hold all connections"
        ),
        "confidence": 0.8,
        "phase": Phase.READ_ONLY,
        "severity": Severity.CRITICAL,
        "domain": "database",
        "proposed_actions": (
            ProposedAction(
                action="terminate_backend", target="billing-worker", risk=RiskClass.MEDIUM
            ),
            ProposedAction(
                action="rollout_restart", target="deployment/billing", risk=RiskClass.LOW
            ),
        ),
    }
    fields.update(overrides)
    return Finding(**fields)


def test_nothing_material_changed_is_accepted() -> None:
    final = TicketFields(
        cause="  idle in transaction sessions from the Billing Worker hold ALL connections. ",
        severity="P1",  # the ticketing system's spelling of critical
        actions=(
            "Rollout_Restart deployment/billing",
            "terminate_backend",
        ),  # any order, name alone
        summary="connection pool exhausted on orders-db",
    )
    assert classify(finding(), final) == (Verdict.ACCEPTED, ())


def test_fields_the_ticket_does_not_record_are_not_changes() -> None:
    assert classify(finding(), TicketFields()) == (Verdict.ACCEPTED, ())
    assert classify(finding(), TicketFields(cause="", severity=" ", summary="")) == (
        Verdict.ACCEPTED,
        (),
    )


def test_changed_fields_are_named_and_the_verdict_is_modified() -> None:
    final = TicketFields(
        cause="Idle-in-transaction sessions from the billing worker hold all connections",
        severity="warning",
        actions=("terminate_backend billing-worker",),  # the restart was dropped
    )
    assert classify(finding(), final) == (Verdict.MODIFIED, ("severity", "actions"))


def test_an_added_action_is_a_modification() -> None:
    final = TicketFields(actions=("terminate_backend", "rollout_restart", "vacuum_full orders"))
    assert classify(finding(), final) == (Verdict.MODIFIED, ("actions",))


def test_a_refined_cause_is_modified_not_rejected() -> None:
    final = TicketFields(
        cause="Idle-in-transaction sessions from the billing worker hold all connections "
        "after the 2.3 release removed the commit in retry()"
    )
    assert classify(finding(), final) == (Verdict.MODIFIED, ("cause",))


def test_a_reworded_cause_is_modified_not_rejected() -> None:
    final = TicketFields(cause="billing worker sessions idle in transaction hold the connections")
    assert classify(finding(), final) == (Verdict.MODIFIED, ("cause",))


def test_a_replaced_cause_is_rejected() -> None:
    final = TicketFields(cause="max_connections was lowered by a config push", severity="critical")
    assert classify(finding(), final) == (Verdict.REJECTED, ("cause",))


@pytest.mark.parametrize(
    ("agent", "operator", "expected"),
    [
        ("Disk full on /var", "disk   FULL on /var.", CauseChange.UNCHANGED),
        ("", "disk full on /var", CauseChange.SUPPLIED),
        ("disk full", "disk full on /var from runaway logs", CauseChange.REFINED),
        ("disk full on /var from runaway logs", "runaway logs", CauseChange.REFINED),
        ("runaway logs filled /var", "/var filled by runaway logs", CauseChange.REWORDED),
        ("disk full on /var", "expired TLS certificate", CauseChange.REPLACED),
        ("db", "dbx outage", CauseChange.REPLACED),  # containment is by whole words
    ],
)
def test_compare_cause(agent, operator, expected) -> None:
    assert compare_cause(agent, operator) is expected


def test_an_operator_supplying_the_cause_of_an_inconclusive_finding_is_a_modification() -> None:
    inconclusive = finding(probable_cause="", conclusion=Conclusion.INCONCLUSIVE)
    assert classify(inconclusive, TicketFields(cause="a noisy neighbour")) == (
        Verdict.MODIFIED,
        ("cause",),
    )


def test_feedback_from_ticket_names_the_investigation_scope_and_phase() -> None:
    fb = feedback_from_ticket(finding(), TicketFields(severity="info"), at=CLOSED, operator="alice")
    assert (fb.investigation_id, fb.scope, fb.phase) == ("inv-42", "database", Phase.READ_ONLY)
    assert (fb.verdict, fb.changed_fields, fb.at, fb.operator) == (
        Verdict.MODIFIED,
        ("severity",),
        CLOSED,
        "alice",
    )
    assert fb.shadow is None
    # It is valid on the wire, and a re-sent close carries the same id (so it counts once)
    assert decode(encode(fb), OperatorFeedback) == fb
    assert feedback_from_ticket(finding(), TicketFields(), at=CLOSED).feedback_id == fb.feedback_id


def test_an_overridden_action_wins_over_modified_but_not_over_rejected() -> None:
    kept = feedback_from_ticket(finding(), TicketFields(), at=CLOSED, action_overridden=True)
    assert kept.verdict is Verdict.ACTION_OVERRIDDEN
    replaced = TicketFields(cause="expired TLS certificate")
    assert (
        feedback_from_ticket(finding(), replaced, at=CLOSED, action_overridden=True).verdict
        is Verdict.REJECTED
    )


def test_feedback_needs_a_scope() -> None:
    with pytest.raises(ValueError, match="scope"):
        feedback_from_ticket(finding(domain=""), TicketFields(), at=CLOSED)
    assert (
        feedback_from_ticket(finding(domain=""), TicketFields(), at=CLOSED, scope="team-a").scope
        == "team-a"
    )


def test_in_shadow_the_operators_own_cause_is_compared_and_decides_the_tally() -> None:
    shadow = finding(phase=Phase.SHADOW, idempotency_key="inv-42:shadow")
    # Given the operator's own resolution: same cause in other words, other severity
    agreed = feedback_from_ticket(
        shadow,
        TicketFields(
            cause="billing worker sessions idle in transaction hold the connections",
            severity="warning",
        ),
        at=CLOSED,
    )
    assert agreed.verdict is Verdict.MODIFIED and agreed.shadow is not None and agreed.shadow.agreed
    other = finding(phase=Phase.SHADOW, investigation_id="inv-43", idempotency_key="inv-43:shadow")
    disagreed = feedback_from_ticket(
        other, TicketFields(cause="max_connections was lowered"), at=CLOSED, feedback_id="other"
    )
    assert disagreed.shadow is not None and not disagreed.shadow.agreed
    assert disagreed.shadow.operator_cause == "max_connections was lowered"
    # Then trust counts the agreement, not the wording (two investigations: one verdict each)
    ledger = TrustLedger(TrustSettings())
    ledger.apply_feedback(agreed)
    ledger.apply_feedback(disagreed)
    explained = ledger.explain("database")
    assert (explained.samples, explained.modifications) == (2, 1)
