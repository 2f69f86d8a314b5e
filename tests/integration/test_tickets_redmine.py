"""The loop closed through a real ticketing system: Redmine (Debian's package) ⇄ `agentjobs tickets` ⇄ trust.

Real Redmine (``tests/support/redmine.py``: a private copy of a prepared SQLite image, REST API,
a private project), real RabbitMQ with every component as its own identity, a real OpenBao
bootstrapped by ``vault bootstrap`` holding the Redmine API key in KV (read with a token of the
``agentjobs-tickets`` policy), the real dispatcher and trust consumer where the story needs them.
The tests play the agent (its Job's own broker user) and the operator (Redmine's ``operator``
user, through the REST API as a browser would).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest

from dispatcher.plumbing.identities import TICKETS_QUEUE
from schemas import (
    DeadLetter, LifecycleEvent, LifecycleState, Phase, Verdict, decode, decode_incident, encode, identify, vault_paths,
)
from schemas.routing import DEAD, RESULTS
from tests.integration.dispatcher_harness import drain, publish
from tests.integration.test_dispatcher import running_dispatcher
from tests.integration.test_trust import FAST_TRUST, admitted_feedback, running_trust
from tests.integration.vault_helpers import vault_world
from tests.support.identities import agent_user, url_for, user
from tests.support.payloads import am_alert, dumps, group
from tests.support.redmine import RedmineServer, custom_field
from tests.support.tickets import finding, finding_by, lifecycle_by_dispatcher, publish_as, running_tickets
from tests.support.trust_records import dispatched as trust_dispatched

pytestmark = pytest.mark.integration
CAUSE, ACTIONS = "Root cause", "Actions taken"


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq, redmine):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        root = vault.root()
        await asyncio.to_thread(root.secrets.kv.v2.create_or_update_secret, path=vault_paths.KV_TICKETS,
                                mount_point=vault_paths.KV_MOUNT, secret={"redmine_api_key": redmine.api_key})
        token = (await asyncio.to_thread(root.auth.token.create, policies=[vault_paths.TICKETS_POLICY],
                                         ttl="1h"))["auth"]["client_token"]
        env = {**{k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}, **FAST_TRUST}
        tickets_env = {"AGENTJOBS_VAULT__ADDR": vault.server.addr, "AGENTJOBS_VAULT__TOKEN": token,
                       "AGENTJOBS_TICKETS__REDMINE__URL": redmine.url,
                       "AGENTJOBS_TICKETS__REDMINE__PROJECT": redmine.project,
                       "AGENTJOBS_TICKETS__LOOKBACK": "1", "AGENTJOBS_TICKETS__POLL_INTERVAL": "3600",
                       "AGENTJOBS_RETRY__CAP": "1", "AGENTJOBS_METRICS__PORT": "0"}
        yield k8s_emulator, amqp_vhost.amqp_url, env, tickets_env


async def _until(predicate, timeout: float = 60.0, interval: float = 0.2) -> Any:
    async with asyncio.timeout(timeout):
        while not (result := await asyncio.to_thread(predicate)):
            await asyncio.sleep(interval)
    return result


def _one_ticket(redmine: RedmineServer, key: str) -> dict[str, Any] | None:
    found = redmine.find_issues(key, api_key=redmine.api_key)
    assert len(found) <= 1, f"{len(found)} tickets for one investigation"
    return redmine.get_issue(found[0]["id"], api_key=redmine.api_key) if found else None


def _with_note(redmine: RedmineServer, key: str, text: str):
    def check() -> dict[str, Any] | None:
        issue = _one_ticket(redmine, key)
        if issue and any(text in (j.get("notes") or "") for j in issue.get("journals", [])):
            return issue
        return None
    return check


def _notes(issue: dict[str, Any], text: str) -> list[dict[str, Any]]:
    return [j for j in issue.get("journals", []) if text in (j.get("notes") or "")]


def _incident(name: str) -> bytes:
    alert = am_alert(starts_at="2026-12-04T02:00:00Z", alertname=name, domain="database", severity="critical",
                     instance="ledger-db")
    return dumps(group([alert], group_key=f"tickets-{name}"))


async def test_an_incident_becomes_one_ticket_with_the_finding_and_an_edited_cause_is_tallied_modified(
        world, redmine, rabbitmq_management, amqp_vhost):
    handle, url, env, tickets_env = world
    body = _incident("LedgerLockWaits")
    ident = identify(decode_incident(body))
    async with running_trust(url, env), running_dispatcher(handle, url, **env), \
            running_tickets(url, tickets_env) as tickets:
        # Given an incident the dispatcher turned into a Job
        await publish(url, [body], routing_key="alertmanager.tickets", sender="bridge")
        issue = await _until(lambda: _one_ticket(redmine, ident.investigation_id))
        assert issue["subject"] == "[critical] LedgerLockWaits: LedgerLockWaits on ledger-db"
        assert "LedgerLockWaits" in issue["description"] and "phase shadow" in issue["description"]
        # When its agent (the Job's own broker user) publishes a finding in read-only assist
        async with agent_user(rabbitmq_management, amqp_vhost.name, ident.job_name) as agent:
            await finding_by(url, agent, finding(ident.investigation_id, Phase.SHADOW))
        # Then the ticket shows it privately (shadow) with the record, and nothing in the cause field
        issue = await _until(_with_note(redmine, ident.investigation_id, "SHADOW finding"))
        assert all(j["private_notes"] for j in _notes(issue, "lock_contention"))
        assert not custom_field(issue, CAUSE)
        # When the operator writes the cause they found (a refinement) and closes the ticket
        await asyncio.to_thread(redmine.update_issue, issue["id"], status="Closed", custom_fields={
            CAUSE: "lock contention on table ledger from the nightly batch job"})
        assert await tickets.poll_once() == 1
        # Then trust tallied it from the ticketing identity: modified, the cause named
        fb = await _tallied(url, ident.investigation_id)
        assert fb.verdict is Verdict.MODIFIED and fb.changed_fields == ("cause",)
        assert fb.shadow is not None and fb.shadow.agreed and fb.scope == "database" and fb.phase is Phase.SHADOW
        assert fb.operator == "On-call Operator"
        # and reading the same closed ticket again counts nothing twice
        assert await tickets.poll_once() == 0
    assert [f.investigation_id for f in await admitted_feedback(url)] == [ident.investigation_id]


async def _tallied(url: str, investigation_id: str):
    async with asyncio.timeout(30):
        while True:
            for fb in await admitted_feedback(url):
                if fb.investigation_id == investigation_id:
                    return fb
            await asyncio.sleep(0.3)


async def test_a_close_without_changes_is_accepted(world, redmine):
    _handle, url, env, tickets_env = world
    inv = "ac" + "1" * 38
    async with running_trust(url, env), running_tickets(url, tickets_env) as tickets:
        await lifecycle_by_dispatcher(url, trust_dispatched(inv, Phase.READ_ONLY))
        await finding_by(url, None, finding(inv, Phase.READ_ONLY))
        issue = await _until(_with_note(redmine, inv, "lock_contention"))
        # a visible diagnosis: the cause and actions fields hold the agent's
        assert custom_field(issue, CAUSE) == "lock contention on table ledger"
        assert custom_field(issue, ACTIONS) == "terminate_backend pid 4242"
        await asyncio.to_thread(redmine.update_issue, issue["id"], status="Closed", notes="Confirmed, thanks.")
        assert await tickets.poll_once() == 1
        fb = await _tallied(url, inv)
        assert fb.verdict is Verdict.ACCEPTED and fb.changed_fields == () and fb.phase is Phase.READ_ONLY


async def test_redeliveries_and_a_connector_restart_still_make_one_ticket_with_onefinding(world, redmine):
    _handle, url, _env, tickets_env = world
    inv = "ab" + "2" * 38
    async with running_tickets(url, tickets_env):
        await lifecycle_by_dispatcher(url, trust_dispatched(inv, Phase.READ_ONLY), times=3)
        await _until(lambda: _one_ticket(redmine, inv))
    async with running_tickets(url, tickets_env):  # a restart
        await lifecycle_by_dispatcher(url, trust_dispatched(inv, Phase.READ_ONLY))
        await finding_by(url, None, finding(inv, Phase.READ_ONLY), times=3)
        issue = await _until(_with_note(redmine, inv, "lock_contention"))
        await asyncio.sleep(2)  # let any duplicate land before counting
    issue = await asyncio.to_thread(_one_ticket, redmine, inv)
    assert len(_notes(issue, "Hypotheses, most probable first")) == 1
    assert len(_notes(issue, "agentjobs-record: ")) == 1


async def test_updates_wait_while_redmine_is_down_and_arrive_once_when_it_returns(world, redmine):
    _handle, url, _env, tickets_env = world
    inv = "ad" + "3" * 38
    async with running_tickets(url, tickets_env) as tickets:
        await asyncio.to_thread(redmine.stop)
        try:
            down_at = time.monotonic()
            await lifecycle_by_dispatcher(url, trust_dispatched(inv, Phase.READ_ONLY))
            await finding_by(url, None, finding(inv, Phase.READ_ONLY))
            await asyncio.sleep(30)
            errors = tickets.metrics.backend_errors.labels(backend="redmine", kind="temporary")._value.get()
            assert errors >= 1  # it kept trying, and said so
            assert tickets.metrics.results.labels(kind="finding", outcome="applied")._value.get() == 0
        finally:
            await asyncio.to_thread(redmine.start)
        issue = await _until(_with_note(redmine, inv, "lock_contention"), timeout=60)
        assert time.monotonic() - down_at >= 30
    assert len(_notes(issue, "Hypotheses, most probable first")) == 1
    assert len(redmine.find_issues(inv, api_key=redmine.api_key)) == 1


async def test_forged_and_malformed_results_are_dead_lettered_and_open_no_ticket(world, redmine, rabbitmq_management,
                                                                                 amqp_vhost):
    _handle, url, _env, tickets_env = world
    inv = "ae" + "4" * 38
    async with running_tickets(url, tickets_env) as tickets:
        # another investigation's agent may not speak for this one, nor for the dispatcher
        async with agent_user(rabbitmq_management, amqp_vhost.name, "aj-other-" + "f" * 16) as (name, agent_url):
            await publish_as(agent_url, name, RESULTS, "finding.critical.database", encode(finding(inv)),
                              "forged-finding")
            await publish_as(agent_url, name, RESULTS, "lifecycle.dispatched",
                              encode(trust_dispatched(inv, Phase.AUTONOMOUS)), "forged-dispatch")
        # the dispatcher's own message, but not a lifecycle event
        await publish_as(url_for(url, "dispatcher"), user("dispatcher"), RESULTS, "lifecycle.dispatched",
                          b'{"kind": "lifecycle", "state": "dispatched"', "torn")
        async with asyncio.timeout(30):
            while sum(tickets.metrics.results.labels(kind=k, outcome="dead_lettered")._value.get()
                      for k in ("lifecycle", "finding")) < 3:
                await asyncio.sleep(0.2)
    dead = [decode(m.headers["x-agentjobs-dead-letter"].encode(), DeadLetter) for m in await drain(url, DEAD)]
    mine = sorted((d.message_id, d.reason) for d in dead if d.component == "tickets")
    assert mine == [("forged-dispatch", "forbidden_sender"), ("forged-finding", "forbidden_sender"),
                    ("torn", "invalid_json")]
    assert all(d.message for d in dead)
    assert await asyncio.to_thread(redmine.find_issues, inv, api_key=redmine.api_key) == []


async def test_the_tickets_queue_is_the_connectors_own(world):
    _handle, url, _env, tickets_env = world
    async with running_tickets(url, tickets_env) as tickets:
        assert tickets.ready
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(TICKETS_QUEUE, passive=True)
        assert declared.declaration_result.message_count == 0


async def test_a_ticket_closed_on_resolution_asks_no_verdict_until_an_operator_edits_its_cause(world, redmine):
    _handle, url, env, tickets_env = world
    inv = "af" + "8" * 38
    closing_env = {**tickets_env, "AGENTJOBS_TICKETS__REDMINE__RESOLVED_STATUS": "Closed"}
    async with running_trust(url, env), running_tickets(url, closing_env) as tickets:
        await lifecycle_by_dispatcher(url, trust_dispatched(inv, Phase.READ_ONLY))
        await finding_by(url, None, finding(inv, Phase.READ_ONLY))
        await _until(_with_note(redmine, inv, "lock_contention"))
        resolved = LifecycleEvent(investigation_id=inv, incident_key="k" * 32, state=LifecycleState.RESOLVED,
                                  at=trust_dispatched(inv, Phase.READ_ONLY).at, phase=Phase.READ_ONLY)
        await lifecycle_by_dispatcher(url, resolved)
        issue = await _until(_with_note(redmine, inv, "The alert group resolved"))
        assert issue["status"]["name"] == "Closed"
        # the connector's own closing is nobody's verdict
        assert await tickets.poll_once() == 0
        # an operator's correction of the closed ticket's cause is
        await asyncio.to_thread(redmine.update_issue, issue["id"], custom_fields={
            CAUSE: "a vacuum of table ledger held the lock"})
        assert await tickets.poll_once() == 1
        fb = await _tallied(url, inv)
        assert fb.verdict is Verdict.REJECTED and fb.changed_fields == ("cause",)  # another cause: replaced
