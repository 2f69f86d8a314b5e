"""A follow-up Job: run the one action an operator approved, through the same protocol, nothing else.

The dispatcher launches it (``dispatcher.intake.approvals``) with ``approval.json``
(``schemas.actions.ApprovedAction``) beside the incident, in the phase whose credentials that
action needs. The agent does not investigate: it hands the approved proposal — as its agent
recorded it, never anything the model or the approval said — to the phase gate with
``approved=True`` and the executors of this Job's phase, so:

- the precondition is re-checked (the blocker still blocking, the target still the one proposed):
  otherwise ``skipped_stale``;
- the approval's expiry is asked right before acting (``expiry_guard``): after ``expires_at``
  the action ends ``refused_expired``; then the kill switch, as for every action;
- the blast-radius limits the dispatcher granted this Job apply;
- the idempotency key is the proposing investigation's (``investigation_id`` of the approval):
  an action that investigation (or an earlier follow-up) already carried out answers
  ``already_executed``.

The result is one ``ActionRecord`` per action (carrying ``approval_id`` and the approver), on the
proposing investigation, published with confirms; it is what this Job reports (exit 0 once confirmed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from schemas import ActionRecord, Conclusion, Finding, ProposedAction, utcnow
from schemas.actions import ApprovedAction, records_for
from schemas.logs import get_logger

from . import engine
from .config import AgentEnv
from .reasoning.actions import gate
from .remediation import limits as blast_radius
from .remediation.protocol import (
    ClaimStore,
    Guard,
    Ledger,
    Outcome,
    Refusal,
    RemediationExecutor,
    guarded,
    shared_claims,
)
from .tools.base import Tool

log = get_logger("agentjobs.agent.approved")


class ApprovalUnreadable(Exception):
    """approval.json exists but is not an approved action."""


def read_approval(env: AgentEnv) -> ApprovedAction | None:
    """The approved action this Job runs, or None for an ordinary investigation."""
    try:
        body = env.approval_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ApprovalUnreadable(f"cannot read {env.approval_file.name} ({type(exc).__name__})") from None
    try:
        return msgspec.json.decode(body, type=ApprovedAction)
    except msgspec.DecodeError as exc:
        raise ApprovalUnreadable(f"{env.approval_file.name} is not an approved action ({str(exc)[:200]})") from None


def expired(approved: ApprovedAction, now: datetime) -> Refusal | None:
    """The refusal once the approval ran out (pure)."""
    if now <= approved.expires_at:
        return None
    return Refusal(outcome=Outcome.REFUSED_EXPIRED,
                   reason=f"the approval {approved.approval_id} by {approved.approved_by} expired at "
                          f"{approved.expires_at.isoformat()} (now {now.isoformat()}): not acting")


def expiry_guard(approved: ApprovedAction, then: Guard | None = None,
                 clock: Callable[[], datetime] = utcnow) -> Guard:
    """The guard of a follow-up Job: the approval's expiry, then ``then`` (the kill switch)."""

    async def check(action: ProposedAction) -> Refusal | None:
        refusal = expired(approved, clock())
        if refusal is not None or then is None:
            return refusal
        return await then(action)

    return check


def carrier(approved: ApprovedAction, actions: Sequence[ProposedAction], env: AgentEnv, *, at: datetime) -> Finding:
    """The finding the records are made from (pure; never published: the proposing
    investigation has its own)."""
    summary = f"approved {approved.action.action} {approved.action.target}".strip()
    return Finding(
        investigation_id=approved.investigation_id, incident_key=approved.incident_key or approved.investigation_id,
        idempotency_key=f"{approved.investigation_id}:approval:{approved.approval_id}"[:512],
        summary=summary[:16384], probable_cause="", confidence=0.0, phase=env.phase, domain=approved.domain,
        conclusion=Conclusion.INCONCLUSIVE, proposed_actions=tuple(actions), produced_at=at, reasoner="approval",
    )


def records(approved: ApprovedAction, finding: Finding) -> tuple[ActionRecord, ...]:
    """One record per action, saying whose approval ran it (pure)."""
    return tuple(msgspec.structs.replace(r, approval_id=approved.approval_id, approved_by=approved.approved_by)
                 for r in records_for(finding))


async def run(approved: ApprovedAction, env: AgentEnv, *, tools: Sequence[Tool], guard: Guard | None,
              executors: dict[str, RemediationExecutor] | None = None, ledger: Ledger | None = None,
              claims: ClaimStore | None = None, clock: Callable[[], datetime] = utcnow) -> tuple[ActionRecord, ...]:
    """Gate and execute the approved action; the records of what happened.

    ``claims``: the investigation's shared claim store (``VaultClaims``): the proposing
    investigation's Jobs and every follow-up see one claim per action."""
    closers: list[Any] = []
    if executors is None:
        executors, closers = engine.executors_for(env, tools)
    job_limits = blast_radius.for_job(env.actions, postgres_dsn=env.postgres_dsn, tools=tools)
    try:
        with guarded(expiry_guard(approved, guard, clock)), blast_radius.limited(job_limits), shared_claims(claims):
            actions = await gate([approved.action], env.phase, executors=executors,
                                 investigation_id=approved.investigation_id,
                                 ledger=ledger if ledger is not None else engine.ledger_for(env), approved=True)
    finally:
        await engine.close_tools(closers)
    done = records(approved, carrier(approved, actions, env, at=clock()))
    for record in done:
        log.info("approved_action_ran", action=record.action, target=record.target, outcome=record.outcome,
                 approval_id=approved.approval_id, approved_by=approved.approved_by, reason=record.reason[:300])
    return done
