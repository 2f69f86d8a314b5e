"""The ``Finding`` assembled from a reasoner's ``Assessment``, after the phase gate.

``conclude`` runs the gate (``actions.gate``) and builds the Finding; the
pure ``assemble`` does the building. The ranked hypotheses go into
``Finding.hypotheses`` (each with its evidence for and against: source, query,
excerpt, timestamp) and, for people reading only the summary, as a short
ranked list there; tool calls, LLM tokens and price into ``Finding.cost``.
Alert text in the summary is quoted with ``quote_untrusted``, never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableSet, Sequence

import msgspec

from agent.remediation.protocol import Ledger, RemediationExecutor
from agent.tools.base import bounded
from schemas import Evidence, Finding, ProposedAction, identify, utcnow
from schemas import Hypothesis as WireHypothesis

from .actions import Executor, gate, screen
from .base import Assessment, Hypothesis, Investigation, quote_untrusted

TEXT_CHARS = 16384  # == schemas.finding.Text max_length
MAX_OBSERVATIONS = 100  # tool observations carried as evidence
MAX_HYPOTHESES = 6  # hypotheses carried (ranked; the rest are noise)


def _bounded(e: Evidence) -> Evidence:
    """``e`` within the wire limits (a tool's query may be longer than a Finding carries)."""
    if len(e.query) <= TEXT_CHARS and len(e.source) <= 512:
        return e
    return msgspec.structs.replace(e, source=e.source[:512], query=bounded(e.query, TEXT_CHARS))


def wire_hypothesis(h: Hypothesis) -> WireHypothesis:
    """A reasoner's hypothesis as the Finding carries it (pure; bounded to the wire limits)."""
    return WireHypothesis(cause=h.cause[:512], statement=bounded(h.statement, TEXT_CHARS),
                          score=min(1.0, max(0.0, float(h.score))),
                          evidence_for=tuple(map(_bounded, h.evidence_for)),
                          evidence_against=tuple(map(_bounded, h.evidence_against)))


def ranked_text(hypotheses: Sequence[Hypothesis]) -> str:
    """The hypotheses as a short ranked list for the summary (pure)."""
    return "\n".join(f"{i}. ({h.score:.2f}) {h.statement} — {len(h.evidence_for)} for, "
                     f"{len(h.evidence_against)} against" for i, h in enumerate(hypotheses, 1))


def assemble(
    inv: Investigation,
    assessment: Assessment,
    *,
    investigation_id: str,
    actions: Iterable[ProposedAction] | None = None,
    domain_label: str = "domain",
    supersedes: str | None = None,
) -> Finding:
    """The Finding (idempotency key ``<investigation_id>:finding``); ``actions`` are the gated ones (pure)."""
    incident = inv.incident
    hypotheses = assessment.hypotheses[:MAX_HYPOTHESES]
    alert = quote_untrusted(incident.alertname or incident.group_key)
    summary = f"alert {alert}: {assessment.summary}"
    if hypotheses:
        summary += "\n\nHypotheses, most probable first:\n" + ranked_text(hypotheses)
    evidence: list[Evidence] = [_bounded(o.evidence()) for o in inv.observations[:MAX_OBSERVATIONS]]
    evidence += [Evidence(source="agentjobs", excerpt=bounded(n, TEXT_CHARS)) for n in assessment.notes]
    # Without the gate's verdict nothing counts as executed, and the registry fixes the risk.
    gated = tuple(actions) if actions is not None else screen(assessment.actions)[0]
    return Finding(
        investigation_id=investigation_id,
        incident_key=identify(incident).incident_key,
        idempotency_key=f"{investigation_id}:finding",
        summary=bounded(summary, TEXT_CHARS),
        probable_cause=bounded(assessment.probable_cause, TEXT_CHARS),
        confidence=min(1.0, max(0.0, float(assessment.confidence))),
        phase=inv.phase,
        severity=incident.severity,
        domain=incident.label(domain_label)[:512],
        conclusion=assessment.conclusion,
        evidence=tuple(evidence),
        hypotheses=tuple(map(wire_hypothesis, hypotheses)),
        proposed_actions=gated,
        cost=inv.tally.cost(),
        supersedes=supersedes,
        produced_at=utcnow(),
        reasoner=assessment.reasoner[:512],
    )


async def conclude(
    inv: Investigation,
    assessment: Assessment,
    *,
    investigation_id: str,
    executors: Mapping[str, RemediationExecutor | Executor] | None = None,
    ledger: Ledger | MutableSet[str] | None = None,
    domain_label: str = "domain",
    supersedes: str | None = None,
) -> Finding:
    """Gate the proposed actions by the investigation's phase (executing what it allows, at most once per
    idempotency key in ``ledger``), then assemble the Finding."""
    actions = await gate(assessment.actions, inv.phase, executors=executors, investigation_id=investigation_id,
                         ledger=ledger)
    return assemble(inv, assessment, investigation_id=investigation_id, actions=actions,
                    domain_label=domain_label, supersedes=supersedes)
