"""The ``Finding`` assembled from a reasoner's ``Assessment``, after the phase gate.

``conclude`` runs the gate (``actions.gate``) and builds the Finding; the
pure ``assemble`` does the building. Until ``schemas.Finding`` has fields for
them, the ranked hypotheses travel as a ranked list in the summary and as one
``Evidence`` each (source ``hypothesis``: score, statement, the evidence for
and against with its source, query and timestamp), and the LLM price travels
as an ``Evidence`` with source ``cost``. Alert text in the summary is quoted
with ``quote_untrusted``, never trusted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

from agent.tools.base import bounded
from schemas import Evidence, Finding, ProposedAction, identify, utcnow

from .actions import Executor, gate, screen
from .base import Assessment, Hypothesis, Investigation, Tally, quote_untrusted

TEXT_CHARS = 16384  # == schemas.finding.Text max_length
MAX_OBSERVATIONS = 100  # tool observations carried as evidence
MAX_HYPOTHESES = 6  # hypotheses carried (ranked; the rest are noise)


def _line(e: Evidence) -> str:
    at = f" @ {e.at.isoformat(timespec='seconds')}" if e.at else ""
    failed = " [failed]" if not e.ok else ""
    return f"  - [{e.source}{failed}] {e.query[:200]}{at}: {e.excerpt[:400]}"


def _bounded(e: Evidence) -> Evidence:
    """``e`` within the wire limits (a tool's query may be longer than a Finding carries)."""
    if len(e.query) <= TEXT_CHARS and len(e.source) <= 512:
        return e
    return msgspec.structs.replace(e, source=e.source[:512], query=bounded(e.query, TEXT_CHARS))


def hypothesis_evidence(rank: int, h: Hypothesis) -> Evidence:
    """One hypothesis with its evidence for and against, as an ``Evidence`` entry (pure)."""
    lines = [f"#{rank} score {h.score:.2f}: {h.statement}"]
    lines += ["evidence for:", *(map(_line, h.evidence_for))] if h.evidence_for else ["evidence for: none"]
    lines += ["evidence against:", *(map(_line, h.evidence_against))] if h.evidence_against else [
        "evidence against: none"]
    return Evidence(source="hypothesis", query=f"#{rank} {h.cause}", excerpt=bounded("\n".join(lines), TEXT_CHARS))


def ranked_text(hypotheses: Sequence[Hypothesis]) -> str:
    """The hypotheses as a short ranked list for the summary (pure)."""
    return "\n".join(f"{i}. ({h.score:.2f}) {h.statement} — {len(h.evidence_for)} for, "
                     f"{len(h.evidence_against)} against" for i, h in enumerate(hypotheses, 1))


def cost_evidence(tally: Tally) -> Evidence | None:
    """The LLM usage and price as evidence, until ``Cost`` has fields for them (pure)."""
    if not tally.llm_requests:
        return None
    return Evidence(source="cost", query=f"llm model {tally.llm_model or 'unknown'}",
                    excerpt=f"{tally.llm_requests} request(s): {tally.prompt_tokens} prompt + "
                            f"{tally.completion_tokens} completion tokens ≈ {tally.llm_price_usd:.6f} USD")


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
    evidence += [hypothesis_evidence(i, h) for i, h in enumerate(hypotheses, 1)]
    evidence += [Evidence(source="agentjobs", excerpt=bounded(n, TEXT_CHARS)) for n in assessment.notes]
    if (spent := cost_evidence(inv.tally)) is not None:
        evidence.append(spent)
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
    executors: Mapping[str, Executor] | None = None,
    domain_label: str = "domain",
    supersedes: str | None = None,
) -> Finding:
    """Gate the proposed actions by the investigation's phase, then assemble the Finding."""
    actions = await gate(assessment.actions, inv.phase, executors=executors)
    return assemble(inv, assessment, investigation_id=investigation_id, actions=actions,
                    domain_label=domain_label, supersedes=supersedes)
