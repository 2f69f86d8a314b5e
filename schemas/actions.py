"""What happened to each remediation action: ``ActionRecord`` on the wire, and the kill switch's document.

The agent's phase gate and execution protocol write their decision into each
``ProposedAction``'s params (``decision``, ``outcome``, ``reason``, ``before``/``after``,
``undo``, ``error``, ``idempotency_key``). ``records_for`` turns a gated Finding's actions
into one ``ActionRecord`` each — executed, verified, skipped, refused by the gate or by the
kill switch — which the agent publishes to ``agentjobs.results`` with routing key
``action.<outcome>.<domain>`` (``schemas.routing.action_key``) after the Finding, which
carries the same facts in its actions' params.

``outcome`` is the protocol's outcome when an executor was handed the action
(``executed_verified``, ``executed_not_verified``, ``skipped_stale``, ``failed``,
``already_executed``, ``refused_kill_switch``), else the gate's decision (``propose_only``,
``record_only``, ``never_automatic``, ``no_executor``). It is a string, not an enum, so a
consumer built today still reads a record with an outcome added later (a rate limit's
refusal, an approval, an undo). A breaking change gets a new tag.

``KillSwitch`` is the document at ``agentjobs-kv/data/actions`` (``vault_paths.kv_actions_path``):
``{"enabled": bool, "by", "reason", "at"}``, written by operators (``agentjobs actions
disable|enable``) and read by every agent right before it acts. ``parse_kill_switch``
decides what a read means (pure): no document at all is "never disabled"; anything that is
not a well-formed document is unreadable, and an unreadable switch stops every action.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import msgspec

from .base import Id, Phase, RiskClass, Timestamp, Wire
from .finding import Finding, ProposedAction

Text = Annotated[str, msgspec.Meta(max_length=16384)]
Short = Annotated[str, msgspec.Meta(max_length=512)]

# Params the gate and the protocol write into a ProposedAction (== agent.remediation.protocol.RECORDED).
RECORDED_PARAMS = ("decision", "outcome", "reason", "before", "after", "undo", "error", "idempotency_key",
                   "previous_outcome")
ACTED = frozenset({"executed_verified", "executed_not_verified"})


class ActionRecord(Wire, tag="action_record", kw_only=True):
    """One decision about one proposed action of one investigation (an audit entry)."""

    investigation_id: Id
    action: Short  # registry name, e.g. terminate_backend
    target: Short = ""  # e.g. pid 4242 on database pg-0
    risk: RiskClass
    decision: Short  # the gate's: execute, propose_only, record_only, never_automatic, no_executor
    outcome: Short  # see the module docstring; routes the record (action.<outcome>.<domain>)
    executed: bool = False  # the action was carried out (by this attempt or an earlier one of the Job)
    reason: Text = ""
    before: Text = ""  # what the executor saw right before acting
    after: Text = ""  # what verification saw
    undo: Text = ""  # one line telling an operator how to undo it, or "none (why)"
    error: Text = ""
    previous_outcome: Short = ""  # already_executed: how the earlier attempt ended
    params: dict[str, str] = {}  # what identifies the target (pid, application_name, replicas, ...)
    phase: Phase
    domain: Short = ""
    at: Timestamp
    # investigation + action + target + identifying params: the protocol's key when an executor was
    # handed the action (what its ledger holds), else a digest of the same fields
    idempotency_key: Id
    incident_key: Short = ""
    finding_key: Short = ""  # idempotency key of the Finding that carries the same action
    rationale: Text = ""  # why the agent proposed it (the evidence it saw), for whoever approves it
    approval_id: Short = ""  # set when an operator's approval decided (or ran) it
    approved_by: Short = ""  # the approving operator's broker user (validated by the broker, not claimed)

    @property
    def record_id(self) -> str:
        """Message id: one per key and outcome, so a redelivered copy is recognisable."""
        return f"{self.idempotency_key}:{self.outcome}"[:512]


def _digest_key(investigation_id: str, action: ProposedAction, params: Mapping[str, str]) -> str:
    ident = json.dumps([investigation_id, action.action, action.target, sorted(params.items())],
                       separators=(",", ":"))
    return f"{investigation_id}:{action.action}:{hashlib.sha256(ident.encode()).hexdigest()[:32]}"[:512]


def record_of(action: ProposedAction, finding: Finding, *, at: datetime) -> ActionRecord | None:
    """The record of one gated action (pure); None for an action the gate never saw (no ``decision``)."""
    p = action.params
    decision = p.get("decision")
    if not decision:
        return None
    ident = {k: v for k, v in p.items() if k not in RECORDED_PARAMS}
    outcome = p.get("outcome") or decision
    return ActionRecord(
        investigation_id=finding.investigation_id, action=action.action, target=action.target, risk=action.risk,
        decision=decision, outcome=outcome, executed=action.executed, reason=p.get("reason", ""),
        before=p.get("before", ""), after=p.get("after", ""), undo=p.get("undo", ""), error=p.get("error", ""),
        previous_outcome=p.get("previous_outcome", ""), params=ident, phase=finding.phase, domain=finding.domain,
        at=at, idempotency_key=p.get("idempotency_key") or _digest_key(finding.investigation_id, action, ident),
        incident_key=finding.incident_key, finding_key=finding.idempotency_key, rationale=action.rationale,
    )


def records_for(finding: Finding, *, at: datetime | None = None) -> tuple[ActionRecord, ...]:
    """One ``ActionRecord`` per gated action of ``finding``, in its order (pure; ``at``: default produced_at)."""
    when = at or finding.produced_at
    if when is None:
        raise ValueError("records_for: the finding has no produced_at; pass at=")
    return tuple(r for a in finding.proposed_actions if (r := record_of(a, finding, at=when)) is not None)


# --- approvals: an operator runs one proposal the phase did not allow -------------------------

APPROVABLE = frozenset({"propose_only", "never_automatic"})  # gate decisions an operator may approve
APPROVED = "approved"  # the dispatcher accepted an approval and launched its follow-up Job
APPROVAL_REFUSED = "approval_refused"  # the dispatcher refused an approval (expired, approved before, ...)


class ApprovedAction(msgspec.Struct, frozen=True, kw_only=True):
    """What a follow-up Job is handed (``approval.json`` in its Secret): one proposal, approved.

    Built by the dispatcher from the agent's own proposal record and the approval's broker-validated
    sender, never from what the approval said. The follow-up agent runs ``action`` through the
    execution protocol keyed by ``investigation_id`` (the proposing investigation), so the action
    runs at most once however often it is approved, and not at all after ``expires_at``.
    """

    approval_id: Short
    investigation_id: Short  # the investigation that proposed it
    incident_key: Short = ""
    scope: Short = ""
    domain: Short = ""
    action: ProposedAction  # as proposed: registry name, target, risk, identifying params, rationale
    proposal_key: Short  # the proposal record's idempotency key
    approved_by: Short
    reason: Text
    approved_at: datetime
    expires_at: datetime


def proposal_action(record: ActionRecord) -> ProposedAction:
    """The proposal a record describes, as the agent proposed it (pure)."""
    return ProposedAction(action=record.action, target=record.target, risk=record.risk, rationale=record.rationale,
                          params=dict(record.params))


def approval_phase(risk: RiskClass) -> Phase:
    """The phase whose credentials an approved action runs with (pure): the lowest that may run it."""
    return Phase.LIMITED_REMEDIATION if risk is RiskClass.LOW else Phase.AUTONOMOUS


def follow_up_id(proposal_key: str) -> str:
    """The follow-up investigation of one proposal (pure, 40 hex): one Job per proposal, ever."""
    return hashlib.sha1(f"approval\0{proposal_key}".encode()).hexdigest()


# --- the kill switch's document in Vault KV ----------------------------------------------------

class KillSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """``agentjobs-kv/data/actions``: may agents act at all? (not a wire message; a KV document)"""

    enabled: bool
    by: Short = ""  # the operator who last changed it
    reason: Text = ""
    at: str = ""  # ISO 8601, when it was changed

    def document(self) -> dict[str, Any]:
        """The KV data to write (pure)."""
        return msgspec.to_builtins(self)

    def describe(self) -> str:
        """One line for operators and for the refusals it causes (pure)."""
        state = "enabled" if self.enabled else "DISABLED"
        who = " ".join(x for x in (f"by {self.by}" if self.by else "", f"at {self.at}" if self.at else "") if x)
        return f"actions {state}" + (f" {who}" if who else "") + (f": {self.reason}" if self.reason else "")


NEVER_SET = KillSwitch(enabled=True, reason="never disabled (no kill switch document in Vault)")


class KillSwitchUnreadable(Exception):
    """What is stored is not a kill switch document (a read like this stops every action)."""


def parse_kill_switch(data: Mapping[str, Any] | None) -> KillSwitch:
    """The switch a KV read found (pure): None (no document) → enabled; malformed → ``KillSwitchUnreadable``."""
    if data is None:
        return NEVER_SET
    enabled = data.get("enabled")
    if not isinstance(enabled, bool):  # "false" (a string), missing, null: nobody can say what was meant
        raise KillSwitchUnreadable(f"'enabled' is {enabled!r}, not true or false")
    try:
        return msgspec.convert(dict(data), KillSwitch)
    except msgspec.ValidationError as exc:
        raise KillSwitchUnreadable(str(exc)[:200]) from None
