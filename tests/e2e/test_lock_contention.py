"""Lock contention, through the same pipeline as the "2 AM" scenario.

A nightly batch job (application_name ``orders-batch``) updates an order row and then sits
idle inside its open transaction; three checkout sessions want the same row and queue
behind it (the first waits for the batch's transaction, the others for the first's tuple
lock). Everything between that and a finding is real: a private PostgreSQL cluster,
Debian's ``prometheus-postgres-exporter`` and ``prometheus`` with an alert rule on
``pg_locks_count{mode="exclusivelock"}`` (row-lock waiters take tuple locks in
ExclusiveLock mode; outside contention there are none in a database), Debian's
``prometheus-alertmanager`` routing to the bridge of ``agentjobs up`` (bearer token), the
dispatcher with the LocalRuntime, real OpenBao issuing the agent a dynamic PostgreSQL user
and a dynamic RabbitMQ user, and the agent with the ``rules`` reasoner in phase read-only.
"""

from __future__ import annotations

import contextlib
import re

import aiohttp
import psycopg
import pytest

from tests.e2e.stack import NEEDS_OBSERVABILITY_STACK
from tests.support.alertmanager import Alertmanager
from tests.support.observability import (
    PostgresExporter,
    Prometheus,
    blocking_chain,
    running,
)
from tests.support.pipelines import UpRun, no_process, no_vault_users, up_env
from tests.support.services import free_port, wait_until
from tests.support.two_am import running_cluster

pytestmark = [pytest.mark.e2e, *NEEDS_OBSERVABILITY_STACK]

TOKEN = "lock-contention-bridge-token"
ALERT = "PostgresLockContention"
ROOT_APP = "orders-batch"  # holds the row lock, idle in transaction
WAITER_APP = "checkout-api"  # queues behind it
WAITERS = 3
CONTENTION = 'sum by (server, datname) (pg_locks_count{mode="exclusivelock"}) > 0'
RULES = [{
    "name": "orders-database",
    "interval": "1s",
    "rules": [{
        "alert": ALERT,
        "expr": CONTENTION,
        "for": "0s",
        "labels": {"severity": "critical", "domain": "database", "service": "orders"},
        "annotations": {"summary": "sessions on {{ $labels.datname }} queue for row locks",
                        "description": "{{ $value }} tuple locks held or awaited in ExclusiveLock mode"},
    }],
}]


async def _firing(prometheus: Prometheus) -> bool:
    """Whether Prometheus has the alert firing (and so hands it to Alertmanager)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"{prometheus.url}/api/v1/alerts") as resp,
    ):
        body = await resp.json()
    return any(a["labels"].get("alertname") == ALERT and a["state"] == "firing" for a in body["data"]["alerts"])


async def test_a_forgotten_transaction_blocks_a_row_and_the_agent_names_the_root_blocker(
    amqp_vhost, rabbitmq_management, tmp_path,
):
    bridge_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        # Given a PostgreSQL where orders-batch holds a row lock idle in transaction and 3 checkout sessions wait
        pg = await stack.enter_async_context(running_cluster({"log_connections": "on"}))
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute("CREATE ROLE orders LOGIN")
            await admin.execute("GRANT CREATE, USAGE ON SCHEMA public TO orders")
        chain = await stack.enter_async_context(blocking_chain(
            pg.dsn("orders"), pg.dsn(), holder_app=ROOT_APP, waiter_app=WAITER_APP, waiters=WAITERS))
        roles_before = await pg.roles()
        # and the exporter, Prometheus (rule: tuple locks in ExclusiveLock mode) and Alertmanager → the bridge
        for name in ("exporter", "prometheus", "alertmanager"):
            (tmp_path / name).mkdir()
        exporter = await stack.enter_async_context(running(PostgresExporter(tmp_path / "exporter", pg.dsn())))
        alertmanager = Alertmanager(tmp_path / "alertmanager", bridge_port, token=TOKEN)
        stack.callback(alertmanager.stop)
        prometheus = Prometheus(tmp_path / "prometheus", rule_groups=RULES, alertmanagers=[alertmanager.url],
                                scrape_configs=[{"job_name": "postgres",
                                                 "static_configs": [{"targets": [exporter.target]}]}])
        # and `agentjobs up` (real OpenBao, LocalRuntime) with the database and Prometheus as the agent's tools
        env = up_env(tmp_path, amqp_vhost=amqp_vhost, bridge_port=bridge_port, token=TOKEN,
                     AGENTJOBS_POSTGRES__ADMIN_DSN=pg.dsn(), AGENTJOBS_POSTGRES__DSN=pg.address,
                     AGENTJOBS_TOOLS__PROMETHEUS_URL=prometheus.url)
        run = await UpRun(env, tmp_path).start(stack)

        # When the alerting pipeline starts and the contention alert fires
        await alertmanager.start()
        await stack.enter_async_context(running(prometheus))
        try:
            await wait_until(lambda: _firing(prometheus), timeout=45, what=f"{ALERT} firing in Prometheus")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nprometheus log:\n{prometheus.log_tail()}") from None

        # Then within 60 s one finding arrives: lock contention, orders-batch's session the root blocker
        finding, report = await run.finding(ALERT, 60)
        assert finding["kind"] == "finding" and finding["reasoner"] == "rules", report
        assert finding["routing_key"] == "finding.critical.database", report
        assert finding["phase"] == "read-only" and finding["conclusion"] == "conclusive", report
        assert finding["hypotheses"][0]["cause"] == "lock_contention", report
        cause = finding["probable_cause"]
        assert cause.startswith("lock contention") and f"pid {chain.holder_pid}" in cause, report
        assert ROOT_APP in cause and "idle in transaction" in cause and f"blocks {WAITERS} session" in cause, report
        assert WAITER_APP not in cause, report
        # with evidence from the blocking chains (pg_blocking_pids) and from PromQL (the alert's own expression)
        evidence = [e for e in finding["evidence"] if e["ok"]]
        chains = [e for e in evidence if e["source"] == "postgres" and "pg_blocking_pids" in e["query"]]
        assert any(f"root blockers: {chain.holder_pid}" in e["excerpt"]
                   and f"blocker pid {chain.holder_pid} {ROOT_APP}" in e["excerpt"]
                   and all(f"blocked pid {pid} {WAITER_APP}" in e["excerpt"] for pid in chain.waiter_pids)
                   for e in chains), report
        assert any("pg_locks_count" in e["query"] for e in evidence if e["source"] == "prometheus"), report
        # and terminate_backend proposed for the root blocker, not executed (read-only)
        proposed = [a for a in finding["proposed_actions"] if a["action"] == "terminate_backend"]
        assert len(proposed) == 1, report
        params = proposed[0]["params"]
        assert (params.get("pid"), params.get("application_name")) == (str(chain.holder_pid), ROOT_APP), report
        assert proposed[0]["executed"] is False, report
        assert not any(a["executed"] for a in finding["proposed_actions"]), report
        # and the agent left every session of the chain alone
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                                      ([chain.holder_pid, *chain.waiter_pids],))
            alive = {row[0] for row in await cur.fetchall()}
        assert alive == {chain.holder_pid, *chain.waiter_pids}, report
        # and looked at the database as its own Vault-issued user (log_connections names it)
        agent_users = set(re.findall(r"connection authorized: user=(\S+) .*application_name=agentjobs-agent",
                                     pg.log_path.read_text(errors="replace")))
        assert len(agent_users) == 1 and not agent_users & roles_before, (agent_users, pg.log_tail(60))
        # One Job for the alert group
        dispatched = run.dispatched()
        assert len(dispatched) == 1 and "(phase read-only)" in dispatched[0], report
        # and the agent's credentials did not outlive its Job (OpenBao still running)
        await wait_until(lambda: _no_new_roles(pg, roles_before), timeout=30,
                         what="the agent's Vault-issued PostgreSQL user dropped after its Job")
        await wait_until(lambda: no_vault_users(rabbitmq_management, amqp_vhost.name), timeout=30,
                         what="the agent's Vault-issued broker user revoked after its Job")

        # When SIGTERM arrives, Then up exits cleanly, one Job only, no process and no credential left
        await run.finish()
        assert await pg.roles() == roles_before
        assert await no_vault_users(rabbitmq_management, amqp_vhost.name)
    # and every service the test started is gone too
    for pattern in (str(tmp_path), str(pg.root)):
        assert no_process(pattern), pattern


async def _no_new_roles(pg, before: set[str]) -> bool:
    return await pg.roles() <= before
