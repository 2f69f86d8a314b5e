"""Turn a ticket's final state into operator feedback, so integrators don't hand-roll it.

A ticketing integration knows the agent's ``Finding`` and, when the ticket is
closed, what the operator left in it. ``classify`` compares the two:

- ``accepted``: nothing material changed. Case, whitespace, punctuation and
  Unicode compatibility forms are not material (text is compared as its
  sequence of lower-cased words).
- ``modified``: some fields changed; their names are returned (``cause``,
  ``severity``, ``actions``, ``summary``). A cause is *modified*, not replaced,
  when one contains the other as a run of words (a refinement), when the words
  largely overlap (Jaccard >= ``similar_at``, a rewording), or when the agent
  gave no cause and the operator supplied one.
- ``rejected``: the cause was replaced — none of the above holds.

A ticket field left as ``None`` (or blank) is "not recorded" and never counts
as a change: tickets that do not track severity say nothing about it. Severity
is compared on our scale (``Severity.parse``: "P1", "high" → critical).
Actions are compared as sets, ignoring order; a ticket action matches a
proposed one by name alone or by "name target".

For a shadow-phase finding, ``feedback_from_ticket`` also fills in the shadow
comparison: the operator's own cause agrees with the agent's unless it
replaced it (or the agent had none). In shadow, that comparison is what trust
tallies.
"""

from __future__ import annotations

import enum
import hashlib
import re
import unicodedata
from datetime import datetime

import msgspec

from schemas import Finding, OperatorFeedback, Phase, Severity, ShadowComparison, Verdict

FIELDS = ("cause", "severity", "actions", "summary")  # order of changed_fields
DEFAULT_SIMILAR_AT = 0.5  # word-set Jaccard at or above which a changed cause is a rewording
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits; "_" and punctuation separate words
_MAX_TEXT = 16384  # OperatorFeedback / ShadowComparison text bound (characters)


class TicketFields(msgspec.Struct, frozen=True, kw_only=True):
    """What the operator left in the ticket when it was closed (None: not tracked)."""

    cause: str | None = None
    severity: str | None = None  # free-form, as the ticketing system spells it
    actions: tuple[str, ...] | None = None  # e.g. "rollout_restart deployment/payments"
    summary: str | None = None


class CauseChange(enum.StrEnum):
    """How the ticket's cause relates to the agent's."""

    UNCHANGED = "unchanged"
    SUPPLIED = "supplied"  # the agent gave no cause; the operator did
    REFINED = "refined"  # one contains the other as a run of words
    REWORDED = "reworded"  # mostly the same words
    REPLACED = "replaced"  # a different cause


def words(text: str) -> tuple[str, ...]:
    """Text as lower-cased words; what "material" comparisons look at."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def compare_cause(
    agent: str, operator: str, *, similar_at: float = DEFAULT_SIMILAR_AT
) -> CauseChange:
    """Classify the operator's cause against the agent's."""
    a, o = words(agent), words(operator)
    if a == o:
        return CauseChange.UNCHANGED
    if not a:
        return CauseChange.SUPPLIED
    if not o:
        return CauseChange.UNCHANGED  # nothing recorded: no evidence of a change
    sa, so = f" {' '.join(a)} ", f" {' '.join(o)} "
    if sa in so or so in sa:
        return CauseChange.REFINED
    overlap = len(set(a) & set(o)) / len(set(a) | set(o))
    return CauseChange.REWORDED if overlap >= similar_at else CauseChange.REPLACED


def _recorded(value: str | None) -> bool:
    return value is not None and bool(value.strip())


def _actions_changed(finding: Finding, final: tuple[str, ...]) -> bool:
    ticket = {" ".join(words(a)) for a in final} - {""}
    forms = [
        {" ".join(words(p.action)), " ".join(words(f"{p.action} {p.target}"))}
        for p in finding.proposed_actions
    ]
    every_proposed_kept = all(f & ticket for f in forms)
    nothing_added = all(any(t in f for f in forms) for t in ticket)
    return not (every_proposed_kept and nothing_added)


def _compare(
    finding: Finding, final: TicketFields, similar_at: float
) -> tuple[tuple[str, ...], CauseChange | None]:
    changed: list[str] = []
    cause: CauseChange | None = None
    if final.cause is not None and _recorded(final.cause):
        cause = compare_cause(finding.probable_cause, final.cause, similar_at=similar_at)
        if cause is not CauseChange.UNCHANGED:
            changed.append("cause")
    if _recorded(final.severity) and Severity.parse(final.severity) is not finding.severity:
        changed.append("severity")
    if final.actions is not None and _actions_changed(finding, final.actions):
        changed.append("actions")
    if (
        final.summary is not None
        and _recorded(final.summary)
        and words(final.summary) != words(finding.summary)
    ):
        changed.append("summary")
    return tuple(changed), cause


def classify(
    finding: Finding, final: TicketFields, *, similar_at: float = DEFAULT_SIMILAR_AT
) -> tuple[Verdict, tuple[str, ...]]:
    """The verdict a closed ticket implies, and the names of the fields that changed."""
    changed, cause = _compare(finding, final, similar_at)
    if cause is CauseChange.REPLACED:
        return Verdict.REJECTED, changed
    return (Verdict.MODIFIED if changed else Verdict.ACCEPTED), changed


def ticket_feedback_id(finding: Finding) -> str:
    """Stable id for "this finding's ticket closed": re-sending it counts once."""
    key = f"{finding.investigation_id}\x00{finding.idempotency_key}".encode()
    return "ticket-" + hashlib.sha256(key).hexdigest()[:32]


def feedback_from_ticket(
    finding: Finding,
    final: TicketFields,
    *,
    at: datetime,
    scope: str | None = None,
    operator: str = "",
    feedback_id: str | None = None,
    harmful: bool = False,
    action_overridden: bool = False,
    comment: str = "",
    similar_at: float = DEFAULT_SIMILAR_AT,
) -> OperatorFeedback:
    """The ``OperatorFeedback`` to publish for a closed ticket.

    ``scope`` defaults to the finding's domain; ``feedback_id`` to a stable id
    per finding. ``action_overridden`` (the operator undid or blocked an
    action) wins over ``modified``/``accepted`` but not over ``rejected``.
    """
    scope = finding.domain if scope is None else scope
    if not scope.strip():
        raise ValueError("feedback needs a scope (the finding has no domain)")
    changed, cause = _compare(finding, final, similar_at)
    verdict = Verdict.MODIFIED if changed else Verdict.ACCEPTED
    if cause is CauseChange.REPLACED:
        verdict = Verdict.REJECTED
    elif action_overridden:
        verdict = Verdict.ACTION_OVERRIDDEN
    shadow = None
    if finding.phase is Phase.SHADOW and cause is not None and final.cause is not None:
        agreed = cause not in (CauseChange.REPLACED, CauseChange.SUPPLIED)
        shadow = ShadowComparison(agreed=agreed, operator_cause=final.cause[:_MAX_TEXT])
    return OperatorFeedback(
        feedback_id=feedback_id or ticket_feedback_id(finding),
        investigation_id=finding.investigation_id,
        scope=scope,
        phase=finding.phase,
        verdict=verdict,
        at=at,
        operator=operator,
        changed_fields=changed,
        harmful=harmful,
        shadow=shadow,
        comment=comment[:_MAX_TEXT],
    )
