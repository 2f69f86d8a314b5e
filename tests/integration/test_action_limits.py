"""Blast-radius limits outside the model, against real services.

The agent (real PostgreSQL, the lock pile-up of ``test_remediation_postgres``, an autonomous Job
whose environment is what the dispatcher hands it): an allowance of 0 → ``refused_limit`` and the
blocker survives; its database outside the allow-list → ``refused_target``; two proposals in one
investigation → the second ``refused_limit``. The dispatcher (``DispatcherService`` on real
RabbitMQ and the emulated cluster): three ``action.executed_*`` records of scope database from an
agent-shaped broker user within the hour → the next Job's environment carries ALLOWANCE=0, also
after a restart (the action log is replayed); records from anyone else are never counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent import config, engine
from agent.publish import action_messages, publish_all
from agent.reasoning import Tally
from agent.reasoning.actions import gate
from agent.remediation.limits import LIMIT_TARGET, database_of, for_job
from agent.remediation.postgres import Database, executors
from agent.remediation.protocol import FileLedger, MemoryLedger
from dispatcher.intake.phases import StaticPhases
from dispatcher.intake.service import DispatcherService
from dispatcher.jobs.kubernetes import KubernetesRuntime
from schemas import ActionRecord, Phase, RiskClass, utcnow
from schemas.actions import records_for
from tests.integration.dispatcher_harness import declare_topology, publish
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_remediation_postgres import (  # noqa: F401 - db is a fixture
    LOCK_ALERT,
    WAITERS,
    Db,
    alive,
    db,
    lock_pileup,
    terminate_action,
    waiters_proceed,
)
from tests.support.fake_tools import incident
from tests.support.identities import agent_user
from tests.support.k8s.resources import JOBS
from tests.support.payloads import am_alert, dumps, group
from tests.support.services import wait_until

pytestmark = pytest.mark.integration


# --- the agent ----------------------------------------------------------------------------------

def job_environ(db: Db, tmp_path: Path, *, allowance: str = "1", databases: list[str] | None = None) -> dict[str, str]:
    """An autonomous Job's environment as the dispatcher builds it, limits included."""
    dbs = [database_of(db.address)] if databases is None else databases
    return {
        "AGENTJOBS_INVESTIGATION_ID": f"inv-limits-{uuid.uuid4().hex[:8]}", "AGENTJOBS_PHASE": "autonomous",
        "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/", "AGENTJOBS_VAULT__AUTH_MODE": "none",
        "AGENTJOBS_POSTGRES__DSN": db.address, "AGENTJOBS_TOOLS__RABBITMQ": "false", "TMPDIR": str(tmp_path),
        "AGENTJOBS_ACTIONS__ALLOWANCE": allowance, "AGENTJOBS_ACTIONS__MAX_PER_INVESTIGATION": "1",
        "AGENTJOBS_ACTIONS__NAMESPACES": "[]", "AGENTJOBS_ACTIONS__DATABASES": json.dumps(dbs),
        "AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS": "[]",
    }


def job_env(db: Db, tmp_path: Path, **limits) -> config.AgentEnv:
    return config.load(job_environ(db, tmp_path, **limits))


async def investigate(db: Db, env: config.AgentEnv):
    tools, _ = await engine.open_tools(env, db_user=db.agent, db_password=db.password, postgres_available=True)
    try:
        return await engine.investigate(incident("PostgresLockWaits", expr=LOCK_ALERT, instance="pg-0:9187"), env,
                                        tools=tools, tally=Tally())
    finally:
        await engine.close_tools(tools)


def terminate_of(finding):
    [action] = [a for a in finding.proposed_actions if a.action == "terminate_backend"]
    [rec] = [r for r in records_for(finding) if r.action == "terminate_backend"]
    return action, rec


async def test_within_its_limits_the_autonomous_agent_terminates_the_blocker_and_records_the_target(db, tmp_path):
    env = job_env(db, tmp_path)
    # more waiters than any other pile-up on this server: the root blocker the agent picks is ours
    async with lock_pileup(db, waiters=WAITERS + 2) as chain:
        finding = await investigate(db, env)
        await waiters_proceed(chain)
    action, rec = terminate_of(finding)
    assert action.executed and rec.outcome == "executed_verified"
    assert rec.params[LIMIT_TARGET] == f"application_name {chain.holder_app!r} on database {database_of(db.address)}"


async def test_an_allowance_of_zero_is_refused_limit_and_the_blocker_survives(db, tmp_path):
    env = job_env(db, tmp_path, allowance="0")
    async with lock_pileup(db, waiters=3) as chain:
        finding = await investigate(db, env)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
        assert all(not t.done() for t in chain.waiters)
    action, rec = terminate_of(finding)
    assert not action.executed
    assert (rec.decision, rec.outcome, rec.executed) == ("execute", "refused_limit", False)
    assert "hourly allowance is used up" in rec.reason
    assert FileLedger(env.action_ledger_file).seen(rec.idempotency_key) is None  # nothing claimed


async def test_a_database_outside_the_allow_list_is_refused_target_and_the_blocker_survives(db, tmp_path):
    env = job_env(db, tmp_path, databases=["billing"])
    async with lock_pileup(db, waiters=3) as chain:
        finding = await investigate(db, env)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
    action, rec = terminate_of(finding)
    assert not action.executed and rec.outcome == "refused_target"
    assert f"database {database_of(db.address)!r} is outside this Job's allow-list (allowed: billing)" in rec.reason


async def test_a_job_the_dispatcher_gave_no_allow_list_acts_on_nothing(db, tmp_path):
    environ = job_environ(db, tmp_path)
    del environ["AGENTJOBS_ACTIONS__DATABASES"], environ["AGENTJOBS_ACTIONS__NAMESPACES"]
    env = config.load(environ)
    async with lock_pileup(db, waiters=3) as chain:
        finding = await investigate(db, env)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
    _, rec = terminate_of(finding)
    assert rec.outcome == "refused_target" and "gave this Job no database allow-list" in rec.reason


async def test_two_proposals_in_one_investigation_the_second_is_refused_limit(db, tmp_path):
    env = job_env(db, tmp_path)
    database = Database(db.address, user=db.agent, password=db.password, timeout=5,
                        application_name="agentjobs-agent test limits")
    try:
        async with lock_pileup(db, waiters=2) as first, lock_pileup(db, waiters=2) as second:
            proposals = [await terminate_action(db, first), await terminate_action(db, second)]
            gated = await gate(proposals, Phase.AUTONOMOUS, executors=executors(database),
                               investigation_id=env.investigation_id, ledger=MemoryLedger(),
                               limits=for_job(env.actions, postgres_dsn=env.postgres_dsn))
            await waiters_proceed(first)
            assert await alive(db, [first.holder_pid, second.holder_pid]) == {second.holder_pid}
            assert all(not t.done() for t in second.waiters)
    finally:
        await database.close()
    assert [(a.executed, a.params["outcome"]) for a in gated] == [(True, "executed_verified"),
                                                                 (False, "refused_limit")]
    assert "1 destructive execution(s) already in this investigation, at most 1 allowed" in gated[1].params["reason"]


# --- the dispatcher -----------------------------------------------------------------------------

@pytest.fixture
async def cluster(k8s_emulator, amqp_vhost, rabbitmq_management):
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, settings_for(k8s_emulator.namespace))
    return k8s_emulator


@contextlib.asynccontextmanager
async def dispatcher(handle, amqp_vhost):
    settings = settings_for(handle.namespace, AGENTJOBS_AMQP__URL=amqp_vhost.url("dispatcher"),
                            AGENTJOBS_ACTIONS__SCOPES='{"database": {"databases": ["app"]}}')
    runtime = KubernetesRuntime(handle.api_client, namespace=handle.namespace, request_timeout=2,
                                watch_timeout=30, claim_timeout=5)
    service = DispatcherService(settings, runtime, health_port=0,
                                phases=StaticPhases(Phase.SHADOW, {"database": Phase.AUTONOMOUS}))
    await service.start()
    try:
        yield service
    finally:
        await service.stop(drain_timeout=5)


def executed_record(n: int) -> ActionRecord:
    inv = f"earlier-{n}-{uuid.uuid4().hex[:8]}"
    return ActionRecord(investigation_id=inv, action="terminate_backend", target=f"pid {100 + n}",
                        risk=RiskClass.MEDIUM, decision="execute", outcome="executed_verified", executed=True,
                        params={"pid": str(100 + n), LIMIT_TARGET: f"application_name 'batch-{n}' on database app"},
                        phase=Phase.AUTONOMOUS, domain="database", at=utcnow(),
                        idempotency_key=f"{inv}:terminate_backend:{uuid.uuid4().hex}")


async def publish_records(url: str, user: str | None, records: list[ActionRecord]) -> None:
    await publish_all(action_messages(records), amqp_url=url, username=user,
                      password=urlsplit(url).password if user else None, timeout=10, connection_name="test records")


async def launch(url: str, handle, name: str) -> dict[str, str]:
    """An incident of scope database; the env of the Job it became (awaited as the emulator stores it)."""
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=name, domain="database")],
                       group_key=f"limits-{name}"))
    stored: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    def on_write(ev) -> None:  # noqa: ANN001 - the emulator's store event
        if ev.rt is JOBS and name.lower() in ev.obj["metadata"]["name"] and not stored.done():
            stored.set_result(ev.obj)

    handle.cluster.store.subscribe(on_write)
    await publish(url, [body])
    job = await asyncio.wait_for(stored, 30)
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


async def until(predicate, timeout: float = 30.0) -> None:
    async def holds() -> bool:
        return predicate()

    await wait_until(holds, timeout=timeout, what="the dispatcher's action log")


async def test_three_executions_of_a_scope_within_the_hour_leave_the_next_job_nothing(
        cluster, amqp_vhost, rabbitmq_management):
    url = amqp_vhost.amqp_url
    async with dispatcher(cluster, amqp_vhost) as service:
        # records from anyone but an agent user are never counted: the broker administrator without
        # user_id, and the dispatcher's own identity with its validated one
        await publish_records(url, None, [executed_record(i) for i in range(3)])
        await publish_records(amqp_vhost.url("dispatcher"), "agentjobs-dispatcher", [executed_record(9)])
        await until(lambda: service.actions.refused == 4)
        first = await launch(url, cluster, "LimitsFirst")
        assert first["AGENTJOBS_PHASE"] == "autonomous"
        assert (first["AGENTJOBS_ACTIONS__ALLOWANCE"], first["AGENTJOBS_ACTIONS__DATABASES"]) == ("1", '["app"]')
        assert service.actions.executed() == []
        # an agent reports three executions in scope database
        async with agent_user(rabbitmq_management, amqp_vhost.name) as (agent, agent_url):
            await publish_records(agent_url, agent, [executed_record(i) for i in range(3)])
        await until(lambda: len(service.actions.executed()) == 3)
        nxt = await launch(url, cluster, "LimitsNext")
        assert nxt["AGENTJOBS_ACTIONS__ALLOWANCE"] == "0"
        assert nxt["AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS"].count("on database app") == 3
    # a restarted dispatcher replays the last hour before it launches anything
    async with dispatcher(cluster, amqp_vhost) as again:
        assert len(again.actions.executed()) == 3 and again.actions.refused == 4
        after = await launch(url, cluster, "LimitsAfterRestart")
        assert after["AGENTJOBS_ACTIONS__ALLOWANCE"] == "0"


async def test_a_running_job_holds_its_reservation_so_concurrent_jobs_stay_within_the_cap(
        cluster, amqp_vhost, rabbitmq_management):
    url = amqp_vhost.amqp_url
    async with dispatcher(cluster, amqp_vhost) as service:
        async with agent_user(rabbitmq_management, amqp_vhost.name) as (agent, agent_url):
            await publish_records(agent_url, agent, [executed_record(0)])
        await until(lambda: len(service.actions.executed()) == 1)
        grants = [(await launch(url, cluster, f"LimitsConcurrent{i}"))["AGENTJOBS_ACTIONS__ALLOWANCE"]
                  for i in range(3)]
    # 3 per hour: one executed, two running Jobs hold one each, the third gets none
    assert grants == ["1", "1", "0"]
