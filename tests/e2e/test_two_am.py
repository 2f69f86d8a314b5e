"""The "2 AM" scenario, end to end on real services.

A checkout service leaks transactions: most of its database's connections sit idle in
transaction. Everything between that and a finding is the real thing: a private
PostgreSQL cluster (initdb, ``max_connections=20``), Debian's
``prometheus-postgres-exporter`` and ``prometheus`` with an alert rule on connection
saturation, Debian's ``prometheus-alertmanager`` routing to the bridge of ``agentjobs up``
(bearer token), the dispatcher with the LocalRuntime, real OpenBao issuing the agent a
dynamic PostgreSQL user and a dynamic RabbitMQ user, and the agent with the ``rules``
reasoner in phase read-only.

Why 12 sessions of 20: PostgreSQL keeps ``superuser_reserved_connections`` (3) slots for
superusers, and the exporter (2) and OpenBao's database engine (1 or 2: its pool) hold
connections too. The agent's Vault-issued user is no superuser, so it needs one of the 17
ordinary slots to look at ``pg_stat_activity`` at all: with 12 held the server is at 16/20
(80% of ``max_connections``) once the agent is connected, one ordinary slot to spare for a
transient connection (with 13 there was none, and a CI run saw the agent refused once).
With 14 held the agent is refused
("remaining connection slots are reserved ...") and its finding is, honestly,
inconclusive. (PostgreSQL 16's ``reserved_connections`` + ``pg_use_reserved_connections``
would let the diagnostics user in; this machine runs PostgreSQL 15.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.e2e.stack import NEEDS_OBSERVABILITY_STACK
from tests.support.alertmanager import Alertmanager
from tests.support.lines import Lines
from tests.support.observability import (
    PostgresExporter,
    Prometheus,
    idle_in_transaction,
    running,
)
from tests.support.pipelines import agents_under, no_process, no_vault_users, stop
from tests.support.services import free_port, wait_until
from tests.support.two_am import running_cluster
from tests.support.identities import seed_up_credentials

pytestmark = [pytest.mark.e2e, *NEEDS_OBSERVABILITY_STACK]

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
TOKEN = "two-am-bridge-token"
ALERT = "CheckoutDatabaseConnectionsSaturated"
CULPRIT = "checkout-api"
MAX_CONNECTIONS = 20
HELD = 12  # of 20: see the module docstring
SATURATION = ("sum by (server) (pg_stat_activity_count) / on (server) pg_settings_max_connections > 0.6")
RULES = [{
    "name": "checkout-database",
    "interval": "1s",
    "rules": [{
        "alert": ALERT,
        "expr": SATURATION,
        "for": "0s",
        "labels": {"severity": "critical", "domain": "database", "service": "checkout"},
        "annotations": {"summary": "checkout database: over 60% of max_connections in use",
                        "description": "client connections to the checkout PostgreSQL are close to max_connections"},
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


async def test_two_am_idle_transactions_exhaust_connections_and_the_agent_names_the_culprit(
    amqp_vhost, rabbitmq_management, tmp_path,
):
    bridge_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        # Given a PostgreSQL at 20 max_connections, most of them idle in transaction from checkout-api
        pg = await stack.enter_async_context(running_cluster({"max_connections": MAX_CONNECTIONS}))
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute("CREATE ROLE checkout LOGIN")
        await stack.enter_async_context(idle_in_transaction(pg.dsn("checkout"), HELD, application_name=CULPRIT))
        roles_before = await pg.roles()
        # and the exporter, Prometheus (rule: connections > 60% of max) and Alertmanager → the bridge
        for name in ("exporter", "prometheus", "alertmanager"):
            (tmp_path / name).mkdir()
        exporter = await stack.enter_async_context(running(PostgresExporter(tmp_path / "exporter", pg.dsn())))
        alertmanager = Alertmanager(tmp_path / "alertmanager", bridge_port, token=TOKEN)
        stack.callback(alertmanager.stop)
        prometheus = Prometheus(tmp_path / "prometheus", rule_groups=RULES, alertmanagers=[alertmanager.url],
                                scrape_configs=[{"job_name": "postgres",
                                                 "static_configs": [{"targets": [exporter.target]}]}])
        # and `agentjobs up` (real OpenBao, LocalRuntime) with the database and Prometheus as the agent's tools
        seed_up_credentials(tmp_path / "state", amqp_vhost.amqp_url)
        env = {
            **os.environ,
            "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"),
            "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}",
            "AGENTJOBS_METRICS__PORT": str(free_port()),
            "AGENTJOBS_AMQP__URL": amqp_vhost.amqp_url,
            "AGENTJOBS_VAULT__RABBITMQ_VHOST": amqp_vhost.name,
            "AGENTJOBS_BRIDGE__PORT": str(bridge_port),
            "AGENTJOBS_BRIDGE__BEARER_TOKEN": TOKEN,
            "AGENTJOBS_POSTGRES__ADMIN_DSN": pg.dsn(),
            "AGENTJOBS_POSTGRES__DSN": pg.address,
            "AGENTJOBS_TOOLS__PROMETHEUS_URL": prometheus.url,
            "AGENTJOBS_TRUST__INITIAL_PHASE": "read-only",
        }
        up = await asyncio.create_subprocess_exec(AGENTJOBS, "up", env=env, stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.STDOUT)
        stack.push_async_callback(stop, up, signal.SIGTERM, 60)  # on failure; normally stopped below
        out = Lines(up.stdout)  # type: ignore[arg-type]
        await out.wait_for(lambda line: line.startswith("running"), 90, "`running` from up")
        tail = await asyncio.create_subprocess_exec(AGENTJOBS, "tail", "findings", "--json", "--follow", env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stack.push_async_callback(stop, tail, signal.SIGINT, 30)
        findings, said = Lines(tail.stdout), Lines(tail.stderr)  # type: ignore[arg-type]
        await said.wait_for(lambda line: line.startswith("tail: findings"), 30, "tail's ready line")

        # When the alerting pipeline starts and the saturation alert fires
        await alertmanager.start()
        await stack.enter_async_context(running(prometheus))
        try:
            await wait_until(lambda: _firing(prometheus), timeout=45, what=f"{ALERT} firing in Prometheus")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nprometheus log:\n{prometheus.log_tail()}") from None

        # Then within 60 s one finding arrives: connection exhaustion, checkout-api the culprit
        line = await findings.wait_for(lambda line: ALERT in line, 60, f"a finding about {ALERT}")
        finding = json.loads(line)
        ended = await out.wait_for(lambda line: line.strip().startswith(("succeeded", "failed")), 60,
                                   "the investigation's ending")
        report = "\n".join(out.lines) + "\n\n" + json.dumps(finding, indent=1)[:6000]
        assert ended.split()[0] == "succeeded", report
        assert finding["kind"] == "finding" and finding["reasoner"] == "rules", report
        assert finding["routing_key"] == "finding.critical.database", report
        assert finding["phase"] == "read-only" and finding["conclusion"] == "conclusive", report
        assert "connection exhaustion" in finding["probable_cause"], report
        assert CULPRIT in finding["probable_cause"] and CULPRIT in finding["summary"], report
        assert finding["hypotheses"][0]["cause"] == "connection_exhaustion_idle_in_transaction", report
        # with evidence from PromQL (the alert's own expression) and from pg_stat_activity
        evidence = [e for e in finding["evidence"] if e["ok"]]
        promql = [e for e in evidence if e["source"] == "prometheus"]
        activity = [e for e in evidence if e["source"] == "postgres"]
        assert any("pg_stat_activity_count" in e["query"] for e in promql), report
        assert any("pg_stat_activity" in e["query"] and CULPRIT in e["excerpt"] for e in activity), report
        # and terminate_idle_backends proposed for checkout-api, not executed (read-only)
        proposed = [a for a in finding["proposed_actions"] if a["action"] == "terminate_idle_backends"]
        assert len(proposed) == 1, report
        assert proposed[0]["params"].get("application_name") == CULPRIT and proposed[0]["executed"] is False, report
        assert not any(a["executed"] for a in finding["proposed_actions"]), report
        # and the agent saw the database as its own Vault-issued user
        observed_as = {m.group(1) for e in activity if (m := re.search(r"\(observed as (\S+) on target", e["excerpt"]))}
        assert len(observed_as) == 1 and not observed_as & roles_before, report
        # One Job for the alert group
        dispatched = [line for line in out.lines if line.strip().startswith("dispatched")]
        assert len(dispatched) == 1 and "(phase read-only)" in dispatched[0], report
        # and the agent's credentials did not outlive its Job (OpenBao still running)
        await wait_until(lambda: _no_new_roles(pg, roles_before), timeout=30,
                         what="the agent's Vault-issued PostgreSQL user dropped after its Job")
        await wait_until(lambda: no_vault_users(rabbitmq_management, amqp_vhost.name), timeout=30,
                         what="the agent's Vault-issued broker user revoked after its Job")

        # When SIGTERM arrives
        code = await stop(up, signal.SIGTERM, 60)
        text = await out.finished()
        # Then up exits cleanly, still with one Job only, and leaves no process and no credential behind
        assert code == 0, text[-3000:]
        assert "stopped" in text.splitlines()[-1] and "Traceback" not in text, text[-3000:]
        assert len([line for line in text.splitlines() if line.strip().startswith("dispatched")]) == 1, text
        vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
        for pattern in (f"dev-listen-address={vault_listen}", f"{tmp_path}/state"):
            assert no_process(pattern), pattern
        assert not agents_under(tmp_path)
        assert await pg.roles() == roles_before
        assert await no_vault_users(rabbitmq_management, amqp_vhost.name)
    # and every service the test started is gone too
    for pattern in (str(tmp_path), str(pg.root)):
        assert no_process(pattern), pattern


async def _no_new_roles(pg: Any, before: set[str]) -> bool:
    return await pg.roles() <= before

