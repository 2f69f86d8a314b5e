"""What the agent concluded, in a shape a ticketing system can file.

A ``Finding`` is published to ``agentjobs.results`` with routing key
``finding.<severity>.<domain>``. ``idempotency_key`` lets consumers drop
duplicates; ``supersedes`` names the finding a re-investigation replaces.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .base import Id, NonNegativeFloat, NonNegativeInt, Phase, RiskClass, Severity, Timestamp, UnitInterval, Wire
from .lifecycle import FailureReason

Text = Annotated[str, msgspec.Meta(max_length=16384)]
Short = Annotated[str, msgspec.Meta(max_length=512)]


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    """One observation the conclusion rests on (or a tool failure, which is evidence too)."""

    source: Short  # tool name: prometheus, postgres, kubernetes, logs
    query: Text = ""  # what was asked, verbatim
    excerpt: Text = ""  # bounded extract of what came back
    at: Timestamp | None = None
    ok: bool = True  # False when the tool call failed; the excerpt says how


class ProposedAction(msgspec.Struct, frozen=True, kw_only=True):
    """A remediation the agent suggests; the phase decides whether it may run."""

    action: Short  # e.g. rollout_restart, terminate_backend
    target: Short = ""  # e.g. deployment/payments in namespace shop
    risk: RiskClass
    rationale: Text = ""
    params: dict[str, str] = {}
    executed: bool = False  # True only if the phase allowed it and it ran


class Hypothesis(msgspec.Struct, frozen=True, kw_only=True):
    """One candidate cause, scored from the evidence for and against it (ranked in the Finding)."""

    cause: Short  # short code, e.g. connection_exhaustion
    statement: Text = ""  # the cause in a sentence
    score: UnitInterval = 0.0
    evidence_for: tuple[Evidence, ...] = ()
    evidence_against: tuple[Evidence, ...] = ()


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    """What the investigation consumed."""

    llm_prompt_tokens: NonNegativeInt = 0
    llm_completion_tokens: NonNegativeInt = 0
    tool_calls: NonNegativeInt = 0
    cpu_seconds: NonNegativeFloat = 0.0
    wall_seconds: NonNegativeFloat = 0.0
    llm_requests: NonNegativeInt = 0
    llm_model: Short = ""
    llm_price_usd: NonNegativeFloat = 0.0  # from the per-model price table in settings


class Conclusion(enum.StrEnum):
    CONCLUSIVE = "conclusive"
    INCONCLUSIVE = "inconclusive"  # evidence too thin; said honestly


class Finding(Wire, tag="finding", kw_only=True):
    """The agent's result for one investigation."""

    investigation_id: Id
    incident_key: Id
    idempotency_key: Id
    summary: Text
    probable_cause: Text
    confidence: UnitInterval
    phase: Phase
    severity: Severity = Severity.WARNING
    domain: Short = ""
    conclusion: Conclusion = Conclusion.CONCLUSIVE
    evidence: tuple[Evidence, ...] = ()
    hypotheses: tuple[Hypothesis, ...] = ()  # most probable first
    proposed_actions: tuple[ProposedAction, ...] = ()
    cost: Cost = Cost()
    supersedes: Id | None = None
    produced_at: Timestamp | None = None
    reasoner: Short = ""  # rules, openai, ...
    trace_id: Annotated[str, msgspec.Meta(pattern="^([0-9a-f]{32})?$")] = ""  # W3C trace of the investigation
    # Set on a result that is not a conclusion: why the investigation stopped early (e.g.
    # ``alert_resolved`` on the dispatcher's placeholder when the alert resolved while it ran).
    reason: FailureReason | None = None
