"""Every wire type round-trips, is tagged by kind, and tolerates newer producers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
import pytest

from schemas import (
    Cost,
    DeadLetter,
    DecodeError,
    ErrorKind,
    Evidence,
    FailureReason,
    Finding,
    LifecycleEvent,
    LifecycleState,
    OperatorFeedback,
    Phase,
    PhaseChanged,
    ProposedAction,
    RiskClass,
    ShadowComparison,
    Verdict,
    decode,
    decode_incident,
    encode,
    preview,
)
from tests.support.payloads import SAMPLE_WEBHOOK, dumps

AT = datetime(2026, 11, 26, 2, 10, tzinfo=UTC)
INV = "3f168d32240fcedb48841bd0f9ebb56691b1d4c7"

EXAMPLES = [
    decode_incident(dumps(SAMPLE_WEBHOOK)),
    LifecycleEvent(
        investigation_id=INV,
        incident_key="ca9f",
        state=LifecycleState.FAILED,
        reason=FailureReason.OOM_KILLED,
        message="container agent was OOMKilled (exit 137)",
        at=AT,
        job_name="aj-x-3f168d32240fcedb",
        phase=Phase.SHADOW,
    ),
    Finding(
        investigation_id=INV,
        incident_key="ca9f",
        idempotency_key=f"{INV}:1",
        summary="Connection pool exhausted on pg-0",
        probable_cause="checkout leaks idle-in-transaction sessions since rollout 42",
        confidence=0.82,
        phase=Phase.READ_ONLY,
        evidence=(
            Evidence(source="postgres", query="select state, count(*) ...", excerpt="idle in transaction | 171"),
            Evidence(source="logs", query='{app="checkout"}', excerpt="timeout", ok=False),
        ),
        proposed_actions=(
            ProposedAction(action="rollout_restart", target="deployment/checkout", risk=RiskClass.LOW),
        ),
        cost=Cost(tool_calls=7, cpu_seconds=1.5, wall_seconds=12.0),
        supersedes=None,
    ),
    OperatorFeedback(
        feedback_id="fb-1",
        investigation_id=INV,
        scope="database",
        phase=Phase.SHADOW,
        verdict=Verdict.MODIFIED,
        changed_fields=("probable_cause",),
        operator="alice",
        at=AT,
        shadow=ShadowComparison(agreed=False, operator_cause="autovacuum wraparound"),
    ),
    PhaseChanged(
        scope="database",
        from_phase=Phase.SHADOW,
        to_phase=Phase.READ_ONLY,
        at=AT,
        reason="promoted",
        samples=40,
        modification_rate=0.05,
    ),
    DeadLetter(
        error_kind=ErrorKind.PERMANENT,
        reason="invalid_json",
        message="JSON is malformed",
        at=AT,
        preview=preview(b"{not json"),
        original_routing_key="alertmanager.shop",
    ),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_the_tagged_union(message) -> None:
    body = encode(message)
    assert json.loads(body)["kind"] == type(message).__struct_config__.tag
    assert decode(body) == message
    assert decode(body, type(message)) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_fields_from_newer_producers_are_ignored(message) -> None:
    data = json.loads(encode(message))
    data["field_added_in_v2"] = {"nested": [1, 2]}
    assert decode(json.dumps(data).encode()) == message


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        EXAMPLES[1].state = LifecycleState.SUCCEEDED  # type: ignore[misc]


@pytest.mark.parametrize("confidence", [-0.01, 1.01, "high"])
def test_finding_confidence_must_be_within_zero_and_one(confidence) -> None:
    data = json.loads(encode(EXAMPLES[2]))
    data["confidence"] = confidence
    with pytest.raises(DecodeError) as caught:
        decode(json.dumps(data).encode(), Finding)
    assert "$.confidence" in caught.value.message


def test_decoding_an_unknown_kind_names_it() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(b'{"kind": "promotion_v9"}')
    assert caught.value.reason == "unknown_kind"


def test_terminal_states() -> None:
    assert {s for s in LifecycleState if s.terminal} == {
        LifecycleState.SUCCEEDED,
        LifecycleState.FAILED,
        LifecycleState.CANCELLED,
    }


def test_preview_is_bounded_and_never_raises() -> None:
    assert len(preview(b"\xff" * 5000)) == 1024
    assert msgspec.json.decode(encode(EXAMPLES[-1]))["preview"] == "{not json"


def test_phases_are_ordered_for_promotion() -> None:
    assert [p.rank for p in Phase] == [0, 1, 2, 3]
