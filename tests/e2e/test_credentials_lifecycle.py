"""Nothing of an investigation's identity survives its Job — the whole path, for real.

Real OpenBao (bootstrapped by ``agentjobs vault bootstrap``), real PostgreSQL and
RabbitMQ, the dispatcher with its embedded ``LocalRuntime``: an incident becomes a
Job, the Job's process unwraps its token and takes a PostgreSQL and a RabbitMQ
user; however the Job ends, within 10 s the token is invalid, the PostgreSQL role
is gone and the RabbitMQ user is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import psycopg
import pytest

from dispatcher.jobs.local import LocalRuntime
from dispatcher.intake.service import DispatcherService
from dispatcher.plumbing.settings import load_settings
from schemas import FailureReason, Finding, decode_incident, identify
from tests.integration.dispatcher_harness import Results, declare_topology, publish
from tests.integration.vault_helpers import bootstrapped_vault
from tests.support.payloads import am_alert, dumps, group
from tests.support.pipelines import no_vault_users

pytestmark = pytest.mark.e2e
GONE_WITHIN = 10.0  # seconds (issue 5)
HOLD = Path(__file__).resolve().parents[1] / "support" / "hold_credentials.py"
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))


@pytest.fixture
async def world(amqp_vhost, rabbitmq_management, postgres, rabbitmq, tmp_path):
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        # the dispatcher runs as its own identity; incidents come from the operator (publish's
        # default); the broker administrator only watches (Results)
        env = {**vault.env, "AGENTJOBS_AMQP__URL": amqp_vhost.url("dispatcher"),
               "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"),
               "AGENTJOBS_CLASSES__DEFAULT__MEMORY": "1Gi"}
        await declare_topology(amqp_vhost.amqp_url, load_settings(None, env))
        yield vault, env, amqp_vhost, tmp_path


@contextlib.asynccontextmanager
async def dispatcher(env: dict[str, str], state: Path):
    settings = load_settings(None, env)
    service = DispatcherService(settings, LocalRuntime(state / "local"), health_port=0)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(drain_timeout=5)


async def _until(predicate, timeout: float):
    async with asyncio.timeout(timeout):
        while not (result := await predicate()):
            await asyncio.sleep(0.05)
    return result


async def _pg_role_exists(postgres, name: str) -> bool:
    return await postgres.role_exists(name)


async def _vault_pg_roles(postgres) -> set[str]:
    async with await psycopg.AsyncConnection.connect(postgres.dsn) as conn:
        cur = await conn.execute("select rolname from pg_roles where rolname like 'v-%'")
        return {r[0] for r in await cur.fetchall()}


async def _rabbit_user_exists(mgmt, name: str) -> bool:
    return await mgmt.user_exists(name)


def _incident(name: str) -> bytes:
    return dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=name)], group_key=f"e2e-{name}"))


async def test_incident_to_finding_and_nothing_survives_the_job(world, postgres, rabbitmq_management):
    vault, env, vhost, tmp = world
    body = _incident("E2eConnections")
    inv = identify(decode_incident(body)).investigation_id
    env = {**env, "AGENTJOBS_K8S__AGENT_COMMAND": json.dumps([AGENTJOBS, "agent"])}
    roles_before = await _vault_pg_roles(postgres)
    async with Results(vhost.amqp_url) as results, dispatcher(env, tmp):
        await publish(vhost.amqp_url, [body], sender="operator")
        await results.wait_for(lambda: results.keys("lifecycle.succeeded") or results.keys("lifecycle.failed"),
                               timeout=60)
        assert results.keys("lifecycle.succeeded"), results.keys("lifecycle.failed")
        (finding_msg,) = [m for m in results.keys("finding.") if isinstance(m[2], Finding)]
        # The agent investigated with its own dynamic users and published as its own RabbitMQ user
        finding = finding_msg[2]
        assert finding.investigation_id == inv and finding.evidence
        accessor = finding_msg[3]["token_accessor"]
    # Then within 10 s the token, the PostgreSQL role and the RabbitMQ user are gone
    await _until(lambda: asyncio.to_thread(lambda: not vault.token_alive(accessor)), GONE_WITHIN)
    await _until(lambda: _no_new_roles(postgres, roles_before), GONE_WITHIN)
    await _until(lambda: _no_vault_rabbit_users(rabbitmq_management, vhost.name), GONE_WITHIN)


async def _no_vault_rabbit_users(mgmt, vhost: str) -> bool:
    # Vault names them token-…; only this test's vhost: other runs on the broker have their own
    return await no_vault_users(mgmt, vhost)


async def _no_new_roles(postgres, before: set[str]) -> bool:
    return not (await _vault_pg_roles(postgres) - before)


async def _absent(mgmt, user: str) -> bool:
    return not await _rabbit_user_exists(mgmt, user)


@pytest.mark.parametrize("ending", ["sigkill", "oom", "deadline", "cancel"])
async def test_however_the_job_ends_its_credentials_die_with_it(world, postgres, rabbitmq_management, ending):
    vault, env, vhost, tmp = world
    markers = tmp / "markers"
    markers.mkdir()
    mode = "oom" if ending == "oom" else "hold"
    env = {**env, "AGENTJOBS_CLASSES__DEFAULT__COMMAND": json.dumps([sys.executable, str(HOLD), str(markers), mode])}
    if ending == "deadline":
        env["AGENTJOBS_CLASSES__DEFAULT__DEADLINE"] = "4"
    if ending == "oom":
        env["AGENTJOBS_CLASSES__DEFAULT__MEMORY"] = "512Mi"
    body = _incident(f"Hold{ending.title()}")
    ident = identify(decode_incident(body))
    marker = markers / f"{ident.investigation_id}.json"
    async with Results(vhost.amqp_url) as results, dispatcher(env, tmp) as service:
        await publish(vhost.amqp_url, [body], sender="operator")
        # Given the Job's process holds a token, a PostgreSQL user and a RabbitMQ user
        held = await _until(lambda: asyncio.to_thread(lambda: marker.exists() and json.loads(marker.read_text())), 60)
        assert await _pg_role_exists(postgres, held["database_user"])
        assert await _rabbit_user_exists(rabbitmq_management, held["rabbitmq_user"])
        job = service.tracker.get(ident.investigation_id)
        assert job is not None
        # When the Job ends this way
        if ending == "sigkill":
            os.kill(held["pid"], signal.SIGKILL)
        elif ending == "cancel":
            await service.runtime.cancel(ident.job_name)
        await results.wait_for(lambda: results.keys("lifecycle.failed") or results.keys("lifecycle.cancelled"),
                               timeout=60)
    # Then the ticket hears how it ended, and nothing the process held survives it
    expected = {"sigkill": "failed", "oom": "failed", "deadline": "failed", "cancel": "cancelled"}[ending]
    (lifecycle,) = [m[2] for m in results.keys(f"lifecycle.{expected}")]
    if ending == "oom":
        assert lifecycle.reason is FailureReason.OOM_KILLED
    if ending == "deadline":
        assert lifecycle.reason is FailureReason.DEADLINE_EXCEEDED
    await _until(lambda: _absent_role(postgres, held["database_user"]), GONE_WITHIN)
    await _until(lambda: _absent(rabbitmq_management, held["rabbitmq_user"]), GONE_WITHIN)


async def _absent_role(postgres, name: str) -> bool:
    return not await _pg_role_exists(postgres, name)


async def test_an_intercepted_wrapping_token_is_refused_and_the_ticket_is_told(world):
    vault, env, vhost, tmp = world
    intercept = Path(__file__).resolve().parents[1] / "support" / "intercept_then_agent.py"
    env = {**env, "AGENTJOBS_K8S__AGENT_COMMAND": json.dumps([sys.executable, str(intercept), AGENTJOBS])}
    body = _incident("Intercepted")
    async with Results(vhost.amqp_url) as results, dispatcher(env, tmp):
        await publish(vhost.amqp_url, [body], sender="operator")
        await results.wait_for(lambda: results.keys("lifecycle.failed"), timeout=60)
    (failed,) = [m[2] for m in results.keys("lifecycle.failed")]
    assert failed.reason is FailureReason.CREDENTIALS_UNAVAILABLE
    assert "already used or invalid" in failed.message
    assert not [m for m in results.keys("finding.") if m[2].reasoner != "dispatcher"]  # the agent published nothing
