"""Grounding outside the model: what an LLM finding may claim, decided by this investigation's evidence.

A small model writes fluent, confident and wrong findings. What it says is therefore checked, after the
conversation, against what the tools of this investigation really returned — by code, never by asking
the model again:

1. **Cited or dropped.** A hypothesis must cite, in ``evidence_for``, at least one successful
   observation of this investigation (by its ``observation`` number). One that cites nothing — only
   its own words — is dropped, and the finding's notes say so.
2. **Capped by the evidence scoring.** The rules reasoner's deterministic scoring of the same sources
   (``corroboration``: its hypotheses, computed over this investigation's tools, cached calls shared)
   decides how confident a cause may be: at most ``UNCORROBORATED_CAP`` unless the rules scored the
   same cause (or one that tells the same story, ``rules.agree``) higher — then at most that score.
3. **Contradicted, marked.** A cause the rules' evidence rules out (score ≤ ``CONTRADICTED_SCORE``
   with evidence against it) is capped at ``CONTRADICTED_CAP``, carries that evidence against it, and
   the notes say so.
4. **Concluded like rules.** The grounded hypotheses are ranked and concluded by ``rules.conclude``:
   conclusive only when the best reaches 0.6 and leads its rival. So the model can be confident only
   where the evidence scoring is, and a confident wrong finding needs the evidence itself to mislead.

Pure: the caller runs the rules (``LlmReasoner``) and hands their assessment in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from agent.tools.base import Observation

from schemas import Conclusion

from .base import Assessment, Hypothesis
from .rules import INCONCLUSIVE_CONFIDENCE, agree, conclude

UNCORROBORATED_CAP = 0.5  # a cause the evidence scoring does not back stays below "confident" (0.6)
CONTRADICTED_SCORE = 0.15  # a rules score at most this, with evidence against: the evidence rules it out
CONTRADICTED_CAP = 0.2
MODEL_SOURCE = "llm"  # Evidence.source of a claim that cites no observation (LlmReasoner)


def cause_id(text: str) -> str:
    """A model's cause as an identifier: ``"Lock contention"`` → ``lock_contention`` (pure)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:512] or "unknown"


def cited(h: Hypothesis) -> bool:
    """Whether ``h`` rests on at least one successful observation of this investigation."""
    return any(e.source != MODEL_SOURCE and e.ok for e in h.evidence_for)


def ground(model: Assessment, corroboration: Assessment | None, *,
           failures: Sequence[Observation] = ()) -> Assessment:
    """``model``'s assessment with only what the evidence allows (see the module docstring) (pure)."""
    rules = corroboration.hypotheses if corroboration is not None else ()
    notes = list(model.notes)
    kept: list[Hypothesis] = []
    for h in model.hypotheses:
        h = dataclasses.replace(h, cause=cause_id(h.cause))
        if not cited(h):
            notes.append(f"dropped the model's hypothesis {h.cause!r}: it cites no observation of this investigation")
            continue
        same = [r for r in rules if agree(h.cause, r.cause)]
        backing = max((r.score for r in same), default=0.0)
        against = next((r for r in same if r.score <= CONTRADICTED_SCORE and r.evidence_against), None)
        if against is not None and backing <= CONTRADICTED_SCORE:
            notes.append(f"the model's hypothesis {h.cause!r} is contradicted by the evidence "
                         f"({against.evidence_against[0].excerpt[:160]}); capped at {CONTRADICTED_CAP}")
            h = dataclasses.replace(h, score=min(h.score, CONTRADICTED_CAP),
                                    evidence_against=(*h.evidence_against, *against.evidence_against[:3]))
        else:
            cap = max(UNCORROBORATED_CAP, backing)
            if h.score > cap:
                notes.append(f"the model's score for {h.cause!r} ({h.score:.2f}) capped at {cap:.2f}: "
                             + ("what the evidence scoring gives it" if backing > UNCORROBORATED_CAP
                                else "the evidence scoring does not corroborate it"))
                h = dataclasses.replace(h, score=round(cap, 3))
        kept.append(dataclasses.replace(h, log_odds=None))
    ranked = tuple(sorted(kept, key=lambda h: (-h.score, -len(h.evidence_for), h.cause)))
    grounded = conclude(ranked, list(failures), reasoner=model.reasoner, notes=tuple(notes))
    model_top = cause_id(model.hypotheses[0].cause) if model.hypotheses else None
    stands = (grounded.conclusion is Conclusion.CONCLUSIVE and model.conclusion is Conclusion.CONCLUSIVE
              and bool(ranked) and ranked[0].cause == model_top)
    if model.conclusion is Conclusion.INCONCLUSIVE and grounded.conclusion is Conclusion.CONCLUSIVE:
        # the model may be more modest than the evidence, never bolder: its inconclusive stands
        best = ranked[0]
        grounded = dataclasses.replace(
            grounded, conclusion=Conclusion.INCONCLUSIVE, actions=(),
            confidence=round(min(best.score, model.confidence, INCONCLUSIVE_CONFIDENCE), 3),
            summary=f"inconclusive (the model's conclusion); leading hypothesis: {best.statement}",
            probable_cause=f"unknown; leading hypothesis ({best.score:.2f}): {best.statement}")
    if not stands:
        if model.actions:
            grounded = dataclasses.replace(grounded, notes=(
                *grounded.notes, f"{len(model.actions)} action(s) the model proposed were dropped: its conclusion "
                                 "does not stand on the evidence"))
        return grounded
    # The model's own words stand where the evidence lets its conclusion stand.
    return dataclasses.replace(grounded, summary=model.summary, probable_cause=model.probable_cause,
                               confidence=round(min(model.confidence, grounded.confidence), 3),
                               actions=model.actions)
