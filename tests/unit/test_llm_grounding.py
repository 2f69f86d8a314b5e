"""Grounding outside the model (agent/reasoning/grounding.py): an LLM finding claims only what the evidence allows."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from agent.reasoning import causes
from agent.reasoning.base import Assessment, Hypothesis
from agent.reasoning.grounding import CONTRADICTED_CAP, UNCORROBORATED_CAP, cause_id, ground
from schemas import Conclusion, Evidence, ProposedAction, RiskClass

NOW = datetime.now(UTC)
OBSERVED = Evidence(source="postgres", query="-- postgres target default\nSELECT ...", excerpt="3 sessions blocked",
                    at=NOW)
FAILED = Evidence(source="postgres", query="SELECT ...", excerpt="connection refused", at=NOW, ok=False)
CLAIMED = Evidence(source="llm", excerpt="the database is clearly overloaded")
ACTION = ProposedAction(action="terminate_backend", target="pid 42", risk=RiskClass.MEDIUM)


def model(*hypotheses: Hypothesis, confidence: float = 0.9, conclusion: Conclusion = Conclusion.CONCLUSIVE,
          actions: tuple[ProposedAction, ...] = (ACTION,)) -> Assessment:
    return Assessment(reasoner="llm", summary="the model's summary", probable_cause="the model's cause",
                      confidence=confidence, conclusion=conclusion, hypotheses=hypotheses, actions=actions)


def rules(*hypotheses: Hypothesis) -> Assessment:
    return Assessment(reasoner="rules", summary="", probable_cause="", confidence=0.0,
                      conclusion=Conclusion.INCONCLUSIVE, hypotheses=hypotheses)


def h(cause: str, score: float, *evidence: Evidence, against: tuple[Evidence, ...] = ()) -> Hypothesis:
    return Hypothesis(cause=cause, statement=f"statement of {cause}", score=score, evidence_for=evidence,
                      evidence_against=against)


def test_a_cause_the_evidence_scoring_backs_stands_with_the_models_words_and_actions() -> None:
    got = ground(model(h("lock_contention", 0.9, OBSERVED)), rules(h("lock_contention", 0.88, OBSERVED)))
    assert got.conclusion is Conclusion.CONCLUSIVE
    assert (got.summary, got.probable_cause, got.actions) == ("the model's summary", "the model's cause", (ACTION,))
    assert got.hypotheses[0].score == 0.88 and got.confidence == 0.88  # never above the evidence's


def test_an_uncorroborated_cause_is_capped_below_confident_and_proposes_nothing() -> None:
    got = ground(model(h("cosmic_rays", 0.95, OBSERVED)), rules(h("lock_contention", 0.1, OBSERVED)))
    assert got.hypotheses[0].score == UNCORROBORATED_CAP
    assert got.conclusion is Conclusion.INCONCLUSIVE and got.confidence < 0.6 and got.actions == ()
    assert any("capped at 0.50: the evidence scoring does not corroborate it" in n for n in got.notes)
    assert any("action(s) the model proposed were dropped" in n for n in got.notes)


def test_a_hypothesis_citing_no_observation_or_only_failed_ones_is_dropped() -> None:
    got = ground(model(h("lock_contention", 0.9, CLAIMED, FAILED)), rules(h("lock_contention", 0.9, OBSERVED)))
    assert got.hypotheses == () and got.conclusion is Conclusion.INCONCLUSIVE and got.confidence == 0.0
    assert any("'lock_contention': it cites no observation of this investigation" in n for n in got.notes)


def test_a_cause_the_evidence_rules_out_is_marked_contradicted() -> None:
    no_waits = Evidence(source="postgres", excerpt="no session waits for a lock", at=NOW)
    got = ground(model(h("lock_contention", 0.9, OBSERVED)),
                 rules(h("lock_contention", 0.05, against=(no_waits,))))
    [best] = got.hypotheses
    assert best.score == CONTRADICTED_CAP and no_waits in best.evidence_against
    assert any("contradicted by the evidence (no session waits for a lock)" in n for n in got.notes)


def test_agreeing_causes_corroborate_each_other_and_names_are_normalised() -> None:
    got = ground(model(h("Lock Pile-up", 0.8, OBSERVED)), rules(h("lock_contention", 0.85, OBSERVED)))
    assert got.hypotheses[0].cause == "lock_pile_up" != "lock_pileup"  # not a known id: not corroborated
    got = ground(model(h("lock pileup", 0.8, OBSERVED)), rules(h("lock_contention", 0.85, OBSERVED)))
    assert got.hypotheses[0].cause == "lock_pileup" and got.hypotheses[0].score == 0.8


def test_the_model_may_be_more_modest_than_the_evidence_never_bolder() -> None:
    got = ground(model(h("lock_contention", 0.9, OBSERVED), confidence=0.3, conclusion=Conclusion.INCONCLUSIVE),
                 rules(h("lock_contention", 0.9, OBSERVED)))
    assert got.conclusion is Conclusion.INCONCLUSIVE and got.confidence <= 0.3 and got.actions == ()


def test_without_corroboration_every_claim_stays_below_confident() -> None:
    got = ground(model(h("lock_contention", 0.99, OBSERVED)), None)
    assert got.confidence <= UNCORROBORATED_CAP and got.conclusion is Conclusion.INCONCLUSIVE


def test_cause_ids() -> None:
    assert cause_id("Lock contention") == "lock_contention"
    assert cause_id("  --  ") == "unknown"


def test_every_cause_the_reasoners_name_is_in_the_vocabulary_the_model_is_given() -> None:
    source = "\n".join(p.read_text() for p in (Path(__file__).parents[2] / "agent" / "reasoning").glob("*.py"))
    named = set(re.findall(r'cause="([a-z_]+)"', source))
    assert named and named <= set(causes.CAUSES), named - set(causes.CAUSES)
    assert all(f"- {c}: " in causes.vocabulary() for c in named)
