"""`agentjobs up --demo`: real problems on this machine's services, found by the agents, then gone.

The demo creates a lock held by one session with others waiting, an application
hogging connections, and a queue backlog without consumer — each in scratch
objects it owns — and the findings must name those causes in their top
hypothesis and its evidence. On a broker without the management plugin (a
private node, as the chaos tier starts) it runs in the reported reduced mode.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import psycopg
import pytest

from dispatcher.plumbing.settings import AmqpSettings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import RESULTS
from schemas import Finding, decode
from tests.support import private_rabbitmq
from tests.support.pipelines import agents_under, no_vault_users
from tests.support.services import free_port
from tests.support.identities import seed_up_credentials

pytestmark = pytest.mark.e2e
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _env(tmp_path: Path, amqp_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}
    seed_up_credentials(tmp_path / "state", amqp_url)
    return {**env, "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"), "AGENTJOBS_AMQP__URL": amqp_url,
            "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}",
            "AGENTJOBS_METRICS__PORT": str(free_port()), "AGENTJOBS_BRIDGE__PORT": str(free_port()), **extra}


async def _up_demo(env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(AGENTJOBS, "up", "--demo", "--exit", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, out.decode()


async def _findings_queue(amqp_url: str) -> tuple[aio_pika.abc.AbstractConnection, aio_pika.abc.AbstractQueue]:
    """A queue of our own bound to every finding, declared before `up` publishes any."""
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await declare(channel, dispatcher_topology(AmqpSettings(url=amqp_url)))
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(RESULTS, "finding.#")
    return connection, queue


async def _drain(queue: aio_pika.abc.AbstractQueue) -> list[Finding]:
    found = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
        body = decode(message.body)
        if isinstance(body, Finding) and body.reasoner != "dispatcher":
            found.append(body)
    return found


def _postgres_objects() -> set[str]:
    """Databases, roles and the demo applications' sessions on this machine's PostgreSQL."""
    with psycopg.connect(PG, autocommit=True) as pg:
        rows = pg.execute("SELECT 'database ' || datname FROM pg_database "
                          "UNION ALL SELECT 'role ' || rolname FROM pg_roles "
                          "UNION ALL SELECT 'session ' || application_name FROM pg_stat_activity "
                          "WHERE application_name IN ('billing-batch', 'checkout-api', 'report-exporter')").fetchall()
    return {r[0] for r in rows}


def _by_alert(findings: list[Finding]) -> dict[str, Finding]:
    return {f.summary.split('"')[1]: f for f in findings if f.summary.startswith('alert "')}


async def test_demo_findings_name_the_real_causes_and_nothing_is_left(amqp_vhost, rabbitmq_management, tmp_path):
    connection, queue = await _findings_queue(amqp_vhost.amqp_url)
    env = _env(tmp_path, amqp_vhost.amqp_url, AGENTJOBS_VAULT__RABBITMQ_VHOST=amqp_vhost.name)
    postgres_before = _postgres_objects()
    vhosts_before = set(await rabbitmq_management.list_vhosts())
    users_before = set(await rabbitmq_management.list_users())
    try:
        code, text = await _up_demo(env)
        findings = _by_alert(await _drain(queue))
    finally:
        await connection.close()

    assert code == 0, text[-4000:]
    assert "Traceback" not in text
    assert {"PostgresLockContention", "PostgresTooManyConnections", "OrdersQueueBacklog"} <= findings.keys(), text[-4000:]

    lock = findings["PostgresLockContention"].hypotheses[0]
    assert lock.cause == "lock_contention"
    assert '"billing-batch"' in lock.statement and "blocks 3 session(s)" in lock.statement
    assert any("root blocker pid" in e.excerpt for e in lock.evidence_for)

    hog = findings["PostgresTooManyConnections"].hypotheses[0]
    assert hog.cause == "connection_exhaustion_idle_in_transaction"
    assert '"report-exporter"' in hog.statement
    assert any("report-exporter" in e.excerpt for e in hog.evidence_for)

    backlog = findings["OrdersQueueBacklog"].hypotheses[0]
    assert "orders.fulfilment" in backlog.statement and "consumer" in backlog.statement
    assert any("orders.fulfilment" in e.query + e.excerpt for e in backlog.evidence_for)

    # everything the demo created is gone: database, roles, sessions, vhost, broker users, processes
    assert _postgres_objects() - postgres_before == set()  # no database, role (demo or Vault-issued), session
    assert set(await rabbitmq_management.list_vhosts()) <= vhosts_before
    assert set(await rabbitmq_management.list_users()) <= users_before
    assert await no_vault_users(rabbitmq_management, amqp_vhost.name)
    assert not agents_under(tmp_path)
    vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    assert subprocess.run(["pgrep", "-f", f"dev-listen-address={vault_listen}"], capture_output=True).returncode == 1


@pytest.mark.skipif(private_rabbitmq.available() is not None,
                    reason=f"private RabbitMQ node: {private_rabbitmq.available()}")
async def test_up_on_a_broker_without_the_management_plugin_runs_reduced_and_exits_2_when_it_stops(tmp_path):
    postgres_before = _postgres_objects()
    async with private_rabbitmq.private_rabbitmq("agentjobs-fresh") as node:
        connection, queue = await _findings_queue(node.amqp_url)
        try:
            code, text = await _up_demo(_env(tmp_path / "a", node.amqp_url))
            findings = await _drain(queue)
        finally:
            await connection.close()
        assert code == 0, text[-4000:]
        assert "RabbitMQ: reduced mode" in text and "sudo rabbitmq-plugins enable rabbitmq_management" in text
        assert "Traceback" not in text
        assert len(findings) >= 3, text[-4000:]
        assert any("orders.fulfilment" in f.summary for f in findings), [f.summary for f in findings]
        assert _postgres_objects() - postgres_before == set()

        await node.stop_app()
        stopped = await asyncio.to_thread(subprocess.run, [AGENTJOBS, "up", "--demo", "--exit"],
                                          env=_env(tmp_path / "b", node.amqp_url), capture_output=True,
                                          text=True, timeout=60)
    lines = [line for line in (stopped.stdout + stopped.stderr).splitlines() if line.strip()]
    assert stopped.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach RabbitMQ"), lines
    assert "sudo rabbitmq-server -detached" in lines[0]


def test_up_with_postgresql_configured_but_down_says_so_in_one_line_and_exits_2(amqp_vhost, tmp_path):
    env = _env(tmp_path, amqp_vhost.amqp_url, AGENTJOBS_POSTGRES__ADMIN_DSN="postgresql://postgres@127.0.0.1:1/postgres",
               AGENTJOBS_POSTGRES__DSN="postgresql://127.0.0.1:1/postgres")
    done = subprocess.run([AGENTJOBS, "up"], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach PostgreSQL at"), lines
    assert "pg_ctlcluster" in lines[0]
