"""`agentjobs up` in limited remediation: a proposal waits for `agentjobs actions approve`, then runs once.

Real throughout, as in ``test_up_remediation`` (whose harness this reuses): `agentjobs up` on a
private PostgreSQL cluster, an application's forgotten transaction with waiters, the alert
published with `agentjobs publish incident`, and the operator's own commands — `phase pin`,
`actions list`, `actions approve` — with the credentials of up's state dir.

- limited remediation: ``terminate_backend`` (MEDIUM) is ``propose_only``; `actions list` shows it
  with the agent's rationale; the blocker lives;
- `actions approve INVESTIGATION terminate_backend --reason`: the dispatcher answers ``approved``
  (the follow-up Job, in phase autonomous), the follow-up terminates the blocker, verified, the
  waiters proceed; the record names the approval and who approved, on the proposing investigation;
- a second approval of the same proposal is refused ("approved already"), nothing runs twice;
- an approval of something never proposed is refused with the reason (exit 1), nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from tests.e2e.test_up_remediation import (
    UNDO,
    WAITERS,
    Up,
    alive,
    application_role,
    cli,
    lock_alert,
    lock_pileup,
    terminate_action,
    up_env,
    waiting,
)
from tests.support.pipelines import no_vault_users
from tests.support.two_am import POSTGRES_BIN, POSTGRES_MISSING, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(POSTGRES_BIN is None, reason=POSTGRES_MISSING),
              pytest.mark.timeout(600)]


async def test_limited_remediation_proposes_and_an_operators_approval_runs_it_once_in_a_follow_up_job(
    amqp_vhost, rabbitmq_management, tmp_path,
):
    async with contextlib.AsyncExitStack() as stack:
        pg = await stack.enter_async_context(running_cluster())
        role = await stack.enter_async_context(application_role(pg))
        roles_before = await pg.roles()
        env = up_env(tmp_path, amqp_vhost, pg)
        up = await Up(env, tmp_path).start(stack)

        # Given scope database pinned to limited remediation and a forgotten transaction with waiters
        await up.pin("limited-remediation")
        async with lock_pileup(pg, role, "approval-batch") as chain:
            investigation = await up.publish(lock_alert("approval", pg))
            finding, (key, record) = await up.investigated(investigation)
            report = up.report()
            # Then the blocker is proposed only, and waits
            action = terminate_action(finding)
            assert action["params"]["pid"] == str(chain.holder_pid) and action["executed"] is False, report
            assert (key, record.outcome) == ("action.propose_only.database", "propose_only"), report
            assert await alive(pg, [chain.holder_pid]) == {chain.holder_pid}, report

            # and `actions list` shows it with the agent's evidence
            listed = await cli(env, "actions", "list", "--json")
            assert listed.returncode == 0, listed.stderr
            [pending] = [p for p in json.loads(listed.stdout) if p["investigation_id"] == investigation]
            assert (pending["action"], pending["state"], pending["params"]["pid"]) == (
                "terminate_backend", "pending", str(chain.holder_pid)), listed.stdout
            assert "root of a lock chain" in pending["rationale"], listed.stdout

            # When an operator approves something it never proposed: refused before anything is sent
            wrong = await cli(env, "actions", "approve", investigation, "delete_pod", "--reason", "typo")
            assert wrong.returncode != 0 and "proposed no delete_pod" in wrong.stderr, (wrong.stdout, wrong.stderr)

            # When the operator approves the proposal
            approved = await cli(env, "actions", "approve", investigation, "terminate_backend",
                                 "--reason", "batch owner agreed", "--operator", "e2e", "--wait", "30")
            assert approved.returncode == 0, (approved.stdout, approved.stderr, up.report())
            assert "approved by agentjobs-operator: batch owner agreed" in approved.stdout, approved.stdout
            assert "phase autonomous" in approved.stdout, approved.stdout

            # Then the follow-up Job terminates the blocker, verified, and the waiters proceed
            executed = await up.result(investigation, "the follow-up's executed record", 150,
                                       routing_key="action.executed_verified.database")
            report = up.report()
            assert (executed["action"], executed["executed"], executed["phase"]) == (
                "terminate_backend", True, "autonomous"), report
            assert executed["approved_by"] == "agentjobs-operator" and executed["approval_id"], report
            assert executed["params"]["pid"] == str(chain.holder_pid) and executed["undo"] == UNDO, report
            assert await alive(pg, [chain.holder_pid]) == set(), report
            done, pending_waiters = await asyncio.wait(chain.waiters, timeout=15)
            assert not pending_waiters and all(t.exception() is None for t in done), report
            assert await waiting(pg, chain.waiter_pids) == set(), report

            # When it is approved again: refused, recorded, nothing runs twice
            again = await cli(env, "actions", "approve", investigation, "terminate_backend", "--reason", "again")
            assert again.returncode != 0 and "approved already" in again.stderr, (again.stdout, again.stderr)
            listed = await cli(env, "actions", "list", "--all", "--json")
            [shown] = [p for p in json.loads(listed.stdout) if p["investigation_id"] == investigation]
            assert shown["state"] == "approved" and shown["approval_id"] == executed["approval_id"], listed.stdout

        # When up stops: two Jobs (the investigation and its follow-up), one execution, nothing left
        text = await up.finish()
        assert len([line for line in text.splitlines() if line.strip().startswith("dispatched")]) == 2, text
        mine = [r for _, r in up.actions.now(investigation)]
        assert [r.outcome for r in mine].count("executed_verified") == 1, [r.outcome for r in mine]
        assert "approved" in [r.outcome for r in mine], [r.outcome for r in mine]
        up.nothing_left()
        assert await pg.roles() == roles_before
        assert await no_vault_users(rabbitmq_management, amqp_vhost.name)
        assert WAITERS == len(chain.waiter_pids)
