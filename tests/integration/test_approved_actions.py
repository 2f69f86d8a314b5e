"""A follow-up Job's agent against the machine's PostgreSQL: the approved proposal runs once, or not at all.

The proposal is what a limited-remediation investigation of a real lock pile-up recorded
(``propose_only``); the dispatcher's pure builder turns it into the follow-up's ``approval.json``;
the agent in the follow-up's phase (autonomous: ``terminate_backend`` is MEDIUM) runs it through
``agent.approved`` with the remediation role — executed and verified, the waiters proceed — and a
retry answers ``already_executed``; an expired approval leaves the blocker alive and claims nothing.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from agent import approved, config, engine
from agent.remediation.protocol import FileLedger
from dispatcher.intake.actions_log import Proposal
from dispatcher.intake.approvals import approved_action
from dispatcher.plumbing.settings import ActionsSettings
from schemas import ApproveAction, Phase, utcnow
from schemas.actions import ApprovedAction, approval_phase, records_for
from tests.integration.test_remediation_postgres import (  # noqa: F401 - the fixtures
    UNDO,
    Db,
    agent_env,
    alive,
    db,
    granted,
    investigate,
    lock_pileup,
    waiters_proceed,
)

pytestmark = pytest.mark.integration
SETTINGS = ActionsSettings()


async def proposed(db: Db, tmp_path: Path, investigation_id: str) -> Proposal:
    """What the limited-remediation Job recorded about the blocker: its terminate_backend proposal."""
    env = agent_env(db, Phase.LIMITED_REMEDIATION, tmp_path / "proposing", investigation_id)
    finding = await investigate(db, env, db.agent)
    [record] = [r for r in records_for(finding) if r.action == "terminate_backend"]
    assert (record.decision, record.outcome, record.executed) == ("propose_only", "propose_only", False)
    assert "is the root of a lock chain blocking" in record.rationale  # the evidence an operator approves on
    return Proposal(record=record, at=record.at)


def follow_up_env(db: Db, doc: ApprovedAction, tmp_path: Path) -> config.AgentEnv:
    """The follow-up Job: its phase, approval.json in its input dir, its own work dir."""
    inputs = tmp_path / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / config.APPROVAL_FILE).write_bytes(msgspec.json.encode(doc))
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    return config.load({"AGENTJOBS_INVESTIGATION_ID": "follow-up", "AGENTJOBS_PHASE": approval_phase(
                            doc.action.risk).value,
                        "AGENTJOBS_INPUT_DIR": str(inputs), "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/",
                        "AGENTJOBS_VAULT__AUTH_MODE": "none", "AGENTJOBS_POSTGRES__DSN": db.address,
                        "AGENTJOBS_TOOLS__RABBITMQ": "false", "TMPDIR": str(work), **granted(db.address)})


async def run_follow_up(db: Db, env: config.AgentEnv):  # noqa: ANN201
    doc = approved.read_approval(env)
    assert doc is not None
    tools, unavailable = await engine.open_tools(env, db_user=db.agent, db_password=db.password,
                                                 postgres_available=True)
    assert unavailable == []
    try:
        return await approved.run(doc, env, tools=tools, guard=None)
    finally:
        await engine.close_tools(tools)


def approval(investigation_id: str) -> ApproveAction:
    return ApproveAction(approval_id="approval-1", investigation_id=investigation_id, action="terminate_backend",
                         reason="the batch owner agreed", at=utcnow())


async def test_an_approved_proposal_runs_once_in_the_follow_up_and_a_retry_does_not_act_again(db, tmp_path: Path):
    async with lock_pileup(db) as chain:
        proposal = await proposed(db, tmp_path, "inv-approved")
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}  # proposed only: untouched
        doc = approved_action(proposal, approval("inv-approved"), approver="agentjobs-operator",
                              approved_at=utcnow(), settings=SETTINGS, scope="database")
        env = follow_up_env(db, doc, tmp_path / "follow-up")
        assert env.phase is Phase.AUTONOMOUS

        [record] = await run_follow_up(db, env)
        await waiters_proceed(chain)
        assert await alive(db, [chain.holder_pid]) == set()
        # the retried follow-up (same Job, its ledger): not again
        [again] = await run_follow_up(db, env)

    assert (record.outcome, record.executed, record.decision) == ("executed_verified", True, "execute")
    assert record.investigation_id == "inv-approved"  # the proposing investigation: its ticket, its key
    assert (record.approval_id, record.approved_by) == ("approval-1", "agentjobs-operator")
    assert record.params["pid"] == str(chain.holder_pid) and record.undo == UNDO
    assert record.phase is Phase.AUTONOMOUS and record.idempotency_key.startswith("inv-approved:terminate_backend:")
    assert (again.outcome, again.previous_outcome, again.executed) == ("already_executed", "executed_verified", True)


async def test_an_expired_approval_does_not_run_and_claims_nothing(db, tmp_path: Path):
    async with lock_pileup(db, waiters=3) as chain:
        proposal = await proposed(db, tmp_path, "inv-expired")
        late = utcnow() - timedelta(seconds=SETTINGS.approval_ttl + 1)
        doc = approved_action(proposal, approval("inv-expired"), approver="agentjobs-operator", approved_at=late,
                              settings=SETTINGS, scope="database")
        env = follow_up_env(db, doc, tmp_path / "follow-up")
        [record] = await run_follow_up(db, env)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
        assert all(not t.done() for t in chain.waiters)

    assert (record.outcome, record.executed) == ("refused_expired", False)
    assert "expired at" in record.reason and record.approval_id == "approval-1"
    assert FileLedger(env.action_ledger_file).seen(record.idempotency_key) is None


async def test_a_blocker_gone_before_the_approval_is_skipped_stale(db, tmp_path: Path):
    async with lock_pileup(db, waiters=2) as chain:
        proposal = await proposed(db, tmp_path, "inv-stale")
        await chain.holder.rollback()  # the batch finished on its own before anyone approved
        await waiters_proceed(chain)
        doc = approved_action(proposal, approval("inv-stale"), approver="agentjobs-operator", approved_at=utcnow(),
                              settings=SETTINGS, scope="database")
        [record] = await run_follow_up(db, follow_up_env(db, doc, tmp_path / "follow-up"))
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}  # its session lives on

    assert (record.outcome, record.executed) == ("skipped_stale", False)
