"""Approvals: which proposal an approval names, when it is refused, what the follow-up Job is handed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from agent.approved import expired as approval_expired
from agent.approved import expiry_guard
from agent.reasoning.actions import Decision, decide
from dispatcher.intake.actions_log import ActionLog, Proposal, pick
from dispatcher.intake.approvals import UNKNOWN_PROPOSAL, Approvals, Verdict, approved_action, decide as judge
from dispatcher.intake.incidents import APPROVAL_ALERT, approval_incident
from dispatcher.plumbing.settings import ActionsSettings, IdentitySettings, Settings, load_settings
from schemas import ActionRecord, ApproveAction, Phase, ProposedAction, RiskClass, decode, encode
from schemas.actions import APPROVAL_REFUSED, APPROVED, ApprovedAction, approval_phase, follow_up_id
from schemas.errors import PermanentError
from schemas.identity import DNS1123_LABEL_MAX
from agent.remediation.protocol import Outcome

NOW = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
SETTINGS = ActionsSettings(proposal_ttl=3600, approval_ttl=900)
AGENT = "token-aj-inv-1-0f0e3b8c-1d2e-4c5b-9a8f-7e6d5c4b3a21"
DISPATCHER, OPERATOR = "agentjobs-dispatcher", "agentjobs-operator"


def proposal_record(investigation_id: str = "inv-1", *, action: str = "terminate_backend", pid: str = "42",
                    at: datetime = NOW, outcome: str = "propose_only") -> ActionRecord:
    return ActionRecord(investigation_id=investigation_id, action=action, target=f"pid {pid}", risk=RiskClass.MEDIUM,
                        decision=outcome, outcome=outcome, params={"pid": pid, "application_name": "orders-batch"},
                        phase=Phase.LIMITED_REMEDIATION, domain="database", at=at,
                        idempotency_key=f"{investigation_id}:{action}:{pid}", incident_key="incident-1",
                        rationale="pid 42 holds the row lock 10 sessions wait for")


def command(action: str = "terminate_backend", approval_id: str = "a-1", investigation_id: str = "inv-1"
            ) -> ApproveAction:
    return ApproveAction(approval_id=approval_id, investigation_id=investigation_id, action=action,
                         reason="blocker confirmed with the team", at=NOW)


@dataclass
class Message:
    body: bytes
    user_id: str | None


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def log_of(clock: Clock) -> ActionLog:
    return ActionLog(settings=SETTINGS, identities=IdentitySettings(), clock=clock)


# --- picking the proposal -------------------------------------------------------------------------

def test_an_approval_names_its_proposal_by_action_once_proposed_else_by_key() -> None:
    one = Proposal(record=proposal_record(), at=NOW)
    assert pick([one], "inv-1", "terminate_backend") is one
    assert pick([one], "inv-1", "inv-1:terminate_backend:42") is one
    two = Proposal(record=proposal_record(pid="43"), at=NOW)
    why = pick([one, two], "inv-1", "terminate_backend")
    assert isinstance(why, str) and "2 times" in why and "inv-1:terminate_backend:43" in why
    assert pick([one, two], "inv-1", "inv-1:terminate_backend:43") is two
    assert "proposed no delete_pod (it proposed: terminate_backend)" in pick([one], "inv-1", "delete_pod")
    assert "has no proposal awaiting approval" in pick([one], "inv-2", "terminate_backend")


def test_a_proposal_older_than_proposal_ttl_is_refused_as_expired() -> None:
    fresh = Proposal(record=proposal_record(), at=NOW - timedelta(minutes=59))
    assert judge(fresh, command(), settings=SETTINGS, now=NOW) .verdict is Verdict.RUN
    old = Proposal(record=proposal_record(), at=NOW - timedelta(minutes=61))
    got = judge(old, command(), settings=SETTINGS, now=NOW)
    assert got.verdict is Verdict.EXPIRED and "3660 s old" in got.reason and "proposal_ttl" in got.reason


def test_a_second_approval_is_refused_and_a_redelivery_runs_with_the_first_approval_time() -> None:
    first = NOW - timedelta(minutes=5)
    approved = Proposal(record=proposal_record(), at=NOW - timedelta(minutes=10), approval_id="a-1",
                        approved_at=first)
    again = judge(approved, command(approval_id="a-1"), settings=SETTINGS, now=NOW)
    assert again.verdict is Verdict.RUN and again.approved_at == first  # same expiry as the first time
    other = judge(approved, command(approval_id="a-2"), settings=SETTINGS, now=NOW)
    assert other.verdict is Verdict.APPROVED_BEFORE and "a-1" in other.reason


def test_the_follow_up_document_is_the_recorded_proposal_never_the_command() -> None:
    p = Proposal(record=proposal_record(), at=NOW)
    doc = approved_action(p, command(), approver=OPERATOR, approved_at=NOW, settings=SETTINGS, scope="database")
    assert doc.action == ProposedAction(action="terminate_backend", target="pid 42", risk=RiskClass.MEDIUM,
                                        rationale=p.record.rationale,
                                        params={"pid": "42", "application_name": "orders-batch"})
    assert (doc.investigation_id, doc.proposal_key, doc.approved_by) == ("inv-1", "inv-1:terminate_backend:42",
                                                                         OPERATOR)
    assert doc.expires_at == NOW + timedelta(seconds=900)
    assert msgspec.json.decode(msgspec.json.encode(doc), type=ApprovedAction) == doc


def test_an_approved_action_runs_in_the_lowest_phase_that_may_run_its_risk() -> None:
    assert approval_phase(RiskClass.LOW) is Phase.LIMITED_REMEDIATION
    assert approval_phase(RiskClass.MEDIUM) is Phase.AUTONOMOUS
    assert approval_phase(RiskClass.HIGH) is Phase.AUTONOMOUS


def test_the_follow_up_incident_is_one_per_proposal_and_carries_the_proposals_scope() -> None:
    p = Proposal(record=proposal_record(), at=NOW)
    doc = approved_action(p, command(), approver=OPERATOR, approved_at=NOW, settings=SETTINGS, scope="database")
    event, ident = approval_incident(doc, Settings())
    again, ident2 = approval_incident(msgspec.structs.replace(doc, approval_id="a-2"), Settings())
    assert ident.investigation_id == ident2.investigation_id == follow_up_id("inv-1:terminate_backend:42")
    assert ident.job_name == ident2.job_name and len(ident.job_name) <= DNS1123_LABEL_MAX
    assert "approved-terminate-backend" in ident.job_name
    assert event.label("alertname") == APPROVAL_ALERT and event.label("domain") == "database"
    assert ident.incident_key == "incident-1"
    assert decode(encode(event), type(event)) == event  # a valid incident on the wire
    by_team = load_settings(None, {"AGENTJOBS_TRUST__SCOPE_LABEL": "team"})
    event, _ = approval_incident(msgspec.structs.replace(doc, scope="payments"), by_team)
    assert (event.label("domain"), event.label("team")) == ("database", "payments")


# --- the action log keeps proposals and approvals from the right senders only --------------------

def test_proposals_come_from_agents_and_approvals_from_the_dispatcher_only() -> None:
    clock = Clock()
    log = log_of(clock)
    for sender in (OPERATOR, DISPATCHER, None):
        log.on_log_entry(Message(encode(proposal_record(f"forged-{sender}")), sender))
    assert log.proposals() == [] and log.refused == 3
    log.on_log_entry(Message(encode(proposal_record()), AGENT))
    [pending] = log.pending()
    assert pending.record.idempotency_key == "inv-1:terminate_backend:42"
    accepted = msgspec.structs.replace(proposal_record(), outcome=APPROVED, approval_id="a-1")
    log.on_log_entry(Message(encode(accepted), AGENT))  # an agent cannot approve
    log.on_log_entry(Message(encode(accepted), OPERATOR))  # nor an operator by writing the record itself
    assert log.pending() == [pending] and log.refused == 5
    log.on_log_entry(Message(encode(accepted), DISPATCHER))
    assert log.pending() == [] and log.proposals()[0].approval_id == "a-1"


def test_a_proposal_dated_ahead_is_as_old_as_when_it_was_read_and_expires_with_the_ttl() -> None:
    clock = Clock()
    log = log_of(clock)
    log.on_log_entry(Message(encode(proposal_record(at=NOW + timedelta(days=1))), AGENT))
    assert log.proposals()[0].at == NOW
    clock.now = NOW + timedelta(minutes=61)
    assert log.pending() == [] and len(log.proposals()) == 1  # kept, to tell a late approval it expired
    clock.now = NOW + timedelta(minutes=121)
    assert log.proposals() == []


# --- the handler ----------------------------------------------------------------------------------

class Launches:
    def __init__(self) -> None:
        self.docs: list[ApprovedAction] = []
        self.published: list[ActionRecord] = []

    async def launch(self, doc: ApprovedAction) -> str:
        self.docs.append(doc)
        return "aj-approved-terminate-backend-0123456789abcdef"

    async def publish(self, record: ActionRecord) -> None:
        self.published.append(record)


def handler(clock: Clock) -> tuple[Approvals, ActionLog, Launches]:
    log = log_of(clock)
    log.on_log_entry(Message(encode(proposal_record()), AGENT))
    seen = Launches()
    return Approvals(log_=log, settings=SETTINGS, identities=IdentitySettings(), launch=seen.launch,
                     publish=seen.publish, clock=clock), log, seen


async def test_an_operators_approval_launches_the_follow_up_once_and_records_who_and_until_when() -> None:
    clock = Clock()
    approvals, log, seen = handler(clock)
    assert await approvals.handle(command(), OPERATOR) == APPROVED
    [doc] = seen.docs
    assert doc.approved_by == OPERATOR and doc.action.params["pid"] == "42"
    [record] = seen.published
    assert (record.outcome, record.approval_id, record.approved_by, record.investigation_id) == (
        APPROVED, "a-1", OPERATOR, "inv-1")
    assert "runs once in follow-up Job aj-approved-terminate-backend-0123456789abcdef" in record.reason
    assert "phase autonomous" in record.reason and doc.expires_at.isoformat() in record.reason
    # a second approval by someone else: refused, recorded, nothing launched
    clock.now = NOW + timedelta(minutes=1)
    assert await approvals.handle(command(approval_id="a-2"), "agentjobs-admin") == APPROVAL_REFUSED
    assert len(seen.docs) == 1 and seen.published[-1].outcome == APPROVAL_REFUSED
    assert "already approved (approval a-1" in seen.published[-1].reason
    # the first approval redelivered: launched again (the runtime finds the Job), same expiry
    assert await approvals.handle(command(approval_id="a-1"), OPERATOR) == APPROVED
    assert seen.docs[-1].expires_at == doc.expires_at


@pytest.mark.parametrize("sender", [None, "", DISPATCHER, AGENT, "guest"])
async def test_only_operators_and_admins_may_approve(sender: str | None) -> None:
    approvals, _, seen = handler(Clock())
    with pytest.raises(PermanentError) as refused:
        await approvals.handle(command(), sender or "")
    assert refused.value.reason == "forbidden_sender" and seen.docs == [] and seen.published == []


async def test_an_approval_of_nothing_proposed_is_dead_lettered_with_the_reason() -> None:
    approvals, _, seen = handler(Clock())
    with pytest.raises(PermanentError) as refused:
        await approvals.handle(command(action="delete_pod"), OPERATOR)
    assert refused.value.reason == UNKNOWN_PROPOSAL and "proposed no delete_pod" in refused.value.message
    assert seen.docs == []


async def test_an_expired_proposal_is_refused_and_the_refusal_recorded() -> None:
    clock = Clock()
    approvals, _, seen = handler(clock)
    clock.now = NOW + timedelta(hours=1, seconds=1)
    assert await approvals.handle(command(), OPERATOR) == APPROVAL_REFUSED
    assert seen.docs == [] and "older than actions.proposal_ttl" in seen.published[0].reason


# --- the follow-up agent ------------------------------------------------------------------------

def test_approved_actions_pass_the_gate_above_the_phase_and_high_risk_but_never_in_shadow() -> None:
    assert decide("terminate_backend", Phase.LIMITED_REMEDIATION, executors=["terminate_backend"]) \
        is Decision.PROPOSE_ONLY
    assert decide("terminate_backend", Phase.LIMITED_REMEDIATION, executors=["terminate_backend"],
                  approved=True) is Decision.EXECUTE
    assert decide("failover_database", Phase.AUTONOMOUS, approved=True) is Decision.NO_EXECUTOR
    assert decide("failover_database", Phase.AUTONOMOUS) is Decision.NEVER_AUTOMATIC
    assert decide("delete_pod", Phase.SHADOW, executors=["delete_pod"], approved=True) is Decision.RECORD_ONLY


async def test_the_follow_up_refuses_to_act_once_the_approval_expired() -> None:
    p = Proposal(record=proposal_record(), at=NOW)
    doc = approved_action(p, command(), approver=OPERATOR, approved_at=NOW, settings=SETTINGS, scope="database")
    assert approval_expired(doc, NOW + timedelta(seconds=900)) is None
    refusal = approval_expired(doc, NOW + timedelta(seconds=901))
    assert refusal is not None and refusal.outcome is Outcome.REFUSED_EXPIRED and "expired at" in refusal.reason
    asked: list[str] = []

    async def kill_switch(action: ProposedAction):  # noqa: ANN202
        asked.append(action.action)
        return None

    late = Clock()
    late.now = NOW + timedelta(hours=1)
    assert (await expiry_guard(doc, kill_switch, late)(doc.action)).outcome is Outcome.REFUSED_EXPIRED
    assert asked == []  # expired: the switch is not even asked
    assert await expiry_guard(doc, kill_switch, Clock())(doc.action) is None and asked == ["terminate_backend"]


def test_publish_feedback_options_name_the_action_the_verdict_is_about() -> None:
    from dispatcher.cli.main import feedback_from_options

    fb = feedback_from_options(investigation_id="inv-1", scope="database", phase="autonomous",
                               verdict="action_overridden", changed_fields=(), harmful=True, shadow_agreed=None,
                               operator="e2e", comment="", feedback_id="f-1", action="terminate_backend",
                               action_key="inv-1:terminate_backend:42")
    assert (fb.action, fb.action_key, fb.harmful, fb.verdict.value) == (
        "terminate_backend", "inv-1:terminate_backend:42", True, "action_overridden")
