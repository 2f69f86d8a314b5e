"""Approvals: an operator runs one proposal its phase did not allow, once, in a follow-up Job.

``agentjobs actions approve INVESTIGATION ACTION --reason`` publishes an ``ApproveAction`` on
``agentjobs.control``. ``Approvals.handle`` (called by the control consumer):

1. the sender must be an operator or admin (the broker-validated ``user_id``; not the dispatcher,
   not an agent) — else dead-lettered ``forbidden_sender``;
2. catches up the action log, then picks the proposal from the agents' own ``propose_only`` /
   ``never_automatic`` records (``ActionLog``) — the approval only names it; target, params and
   risk come from the record. No such proposal, or an ambiguous name: dead-lettered with the reason;
3. ``decide`` (pure): a proposal older than ``actions.proposal_ttl`` is refused as expired, one
   approved before by another approval is refused as approved already (its follow-up Job exists);
   a redelivery of the accepted approval goes on, idempotently;
4. launches the follow-up Job (``Intake.launch_approved``): phase = the lowest that may run that
   risk (``approval_phase``), its credentials, its RBAC, the scope's blast-radius allowance, the
   kill switch — the same protocol, keyed by the proposing investigation, so it acts at most once;
   the Job's investigation id is ``follow_up_id(proposal key)``: approving twice launches one Job;
5. publishes the decision as an ``ActionRecord`` (``action.approved.<domain>`` with who approved
   and until when it may run, or ``action.approval_refused.<domain>`` with why) on
   ``agentjobs.results`` — the ticket and ``tail actions`` see it, and ``approved`` records in the
   action log tell a restarted dispatcher what was approved.

The follow-up agent refuses to act after ``expires_at`` (``approved_at + actions.approval_ttl``):
``refused_expired``.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec

from schemas import ActionRecord, ApproveAction, utcnow
from schemas.actions import APPROVAL_REFUSED, APPROVED, ApprovedAction, approval_phase, follow_up_id, proposal_action
from schemas.errors import PermanentError, TemporaryError
from schemas.logs import get_logger

from dispatcher.intake import senders
from dispatcher.intake.actions_log import ActionLog, Proposal, expired, pick
from dispatcher.plumbing.settings import ActionsSettings, IdentitySettings

log = get_logger("agentjobs.approvals")
UNKNOWN_PROPOSAL = "unknown_proposal"


class Verdict(enum.StrEnum):
    RUN = "run"  # launch (or re-launch, idempotently) the follow-up Job
    EXPIRED = "expired"
    APPROVED_BEFORE = "approved_before"


@dataclass(frozen=True, kw_only=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    approved_at: datetime | None = None  # RUN: when this approval was (first) accepted


def decide(proposal: Proposal, command: ApproveAction, *, settings: ActionsSettings, now: datetime) -> Decision:
    """What one approval of ``proposal`` leads to (pure)."""
    if proposal.approval_id:
        if proposal.approval_id == command.approval_id:  # a redelivery: same approval, same expiry
            return Decision(verdict=Verdict.RUN, approved_at=proposal.approved_at or now)
        return Decision(verdict=Verdict.APPROVED_BEFORE,
                        reason=f"already approved (approval {proposal.approval_id}"
                               f"{' at ' + proposal.approved_at.isoformat() if proposal.approved_at else ''}); "
                               "its follow-up Job runs it once")
    if expired(proposal, now=now, ttl=timedelta(seconds=settings.proposal_ttl)):
        age = int((now - proposal.at).total_seconds())
        return Decision(verdict=Verdict.EXPIRED,
                        reason=f"the proposal is {age} s old, older than actions.proposal_ttl "
                               f"({settings.proposal_ttl:g} s): what the agent saw is stale; "
                               "a new investigation has to propose it again")
    return Decision(verdict=Verdict.RUN, approved_at=now)


def approved_action(proposal: Proposal, command: ApproveAction, *, approver: str, approved_at: datetime,
                    settings: ActionsSettings, scope: str) -> ApprovedAction:
    """The follow-up Job's document (pure): the recorded proposal, who approved it, until when."""
    record = proposal.record
    return ApprovedAction(
        approval_id=command.approval_id, investigation_id=record.investigation_id, incident_key=record.incident_key,
        scope=scope, domain=record.domain, action=proposal_action(record), proposal_key=record.idempotency_key,
        approved_by=approver, reason=command.reason,
        approved_at=approved_at, expires_at=approved_at + timedelta(seconds=settings.approval_ttl),
    )


def decision_record(proposal: Proposal, *, outcome: str, reason: str, approval_id: str, approver: str,
                    at: datetime) -> ActionRecord:
    """The ``ActionRecord`` of an approval decision (pure): the proposal's, with the decision."""
    return msgspec.structs.replace(proposal.record, outcome=outcome, reason=reason[:16384], approval_id=approval_id,
                                   approved_by=approver, at=at, executed=False)


Launch = Callable[[ApprovedAction], Awaitable[str]]  # → the follow-up Job's name


class Approvals:
    """The control consumer's handler for ``ApproveAction`` (see the module docstring)."""

    def __init__(self, *, log_: ActionLog, settings: ActionsSettings, identities: IdentitySettings,
                 launch: Launch, publish: Callable[[ActionRecord], Awaitable[None]],
                 catch_up: Callable[[], Awaitable[None]] | None = None,
                 scope_of: Callable[[ActionRecord], str] | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.log = log_
        self.settings = settings
        self.identities = identities
        self.launch = launch
        self.publish = publish
        self.catch_up = catch_up
        self.scope_of = scope_of or (lambda record: record.domain)
        self.clock = clock

    async def handle(self, command: ApproveAction, user_id: str) -> str:
        """The decision's outcome (``approved``/``approval_refused``); raises ``PermanentError`` to dead-letter."""
        refused = senders.one_of(user_id, [*self.identities.operators, *self.identities.admins], "approvals")
        if refused is not None:
            raise PermanentError(refused.reason, refused.detail)
        if self.catch_up is not None:  # the proposal may be on its way into the log still
            try:
                await self.catch_up()
            except TemporaryError as exc:
                log.warning("approval_action_log_behind", error=exc.message)
        found = pick(self.log.proposals(), command.investigation_id, command.action)
        if isinstance(found, str):
            raise PermanentError(UNKNOWN_PROPOSAL, found)
        now = self.clock()
        decision = decide(found, command, settings=self.settings, now=now)
        if decision.verdict is not Verdict.RUN:
            record = decision_record(found, outcome=APPROVAL_REFUSED, reason=decision.reason,
                                     approval_id=command.approval_id, approver=user_id, at=now)
            await self.publish(record)
            log.warning("approval_refused", investigation_id=command.investigation_id, action=found.record.action,
                        verdict=decision.verdict.value, approver=user_id, reason=decision.reason[:300])
            return APPROVAL_REFUSED
        approved_at = decision.approved_at or now
        approved = approved_action(found, command, approver=user_id, approved_at=approved_at,
                                   settings=self.settings, scope=self.scope_of(found.record))
        job_name = await self.launch(approved)
        reason = (f"approved by {user_id}: {command.reason} — runs once in follow-up Job {job_name} "
                  f"(phase {approval_phase(found.record.risk).value}, investigation "
                  f"{follow_up_id(found.record.idempotency_key)}) until {approved.expires_at.isoformat()}")
        record = decision_record(found, outcome=APPROVED, reason=reason, approval_id=command.approval_id,
                                 approver=user_id, at=approved_at)
        await self.publish(record)
        self.log.approved(record)  # at once: a second approval right behind this one is refused
        log.info("action_approved", investigation_id=command.investigation_id, action=found.record.action,
                 target=found.record.target, approver=user_id, job_name=job_name,
                 expires_at=approved.expires_at.isoformat())
        return APPROVED
