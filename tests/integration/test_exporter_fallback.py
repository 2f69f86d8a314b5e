"""At connection exhaustion the postgres tool is refused; the exporter's metrics in Prometheus answer.

A private PostgreSQL 15 cluster with ``max_connections = 10`` (3 of them
``superuser_reserved_connections``): one application holds all 7 ordinary slots
(5 idle, 2 idle in transaction). The agent's kind of role (LOGIN and
``pg_read_all_stats``, no superuser) is refused — PostgreSQL 15 has no
``pg_use_reserved_connections`` to give it a reserved path — while Debian's
``prometheus-postgres-exporter``, a superuser connected from a reserved slot, keeps
reporting to a real Prometheus. ``agent.reasoning.exporter`` answers the tool's
questions from there, in the tool's own shape, and says which source answered.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio

from agent.reasoning import exporter
from agent.reasoning.base import Investigation
from agent.reasoning.rules import read_connections
from agent.tools.base import Limits
from agent.tools.postgres import PostgresTool
from agent.tools.prometheus import PrometheusTool
from schemas import Alert, AlertStatus, IncidentEvent, Phase, utcnow
from tests.support.observability import (
    EXPORTER_MISSING,
    POSTGRES_EXPORTER,
    PROMETHEUS,
    PROMETHEUS_MISSING,
    PostgresExporter,
    Prometheus,
    idle_in_transaction,
    running,
    stats_reader_role,
    workdir,
)
from tests.support.two_am import POSTGRES_BIN, POSTGRES_MISSING, PostgresCluster, running_cluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(PROMETHEUS is None, reason=PROMETHEUS_MISSING),
    pytest.mark.skipif(POSTGRES_EXPORTER is None, reason=EXPORTER_MISSING),
    pytest.mark.skipif(POSTGRES_BIN is None, reason=POSTGRES_MISSING),
]

MAX_CONNECTIONS = 10  # 3 reserved for superusers: 7 ordinary slots
IDLE, IDLE_IN_TX = 5, 2  # the 7 ordinary slots, all held by one application
APP = "checkout-api"


@dataclass
class Exhausted:
    pg: PostgresCluster
    prometheus: Prometheus
    exporter: PostgresExporter
    user: str  # the agent's kind of role
    password: str


@contextlib.asynccontextmanager
async def _idle(dsn: str, count: int, application_name: str) -> AsyncIterator[None]:
    conns = [await psycopg.AsyncConnection.connect(dsn, application_name=application_name, autocommit=True)
             for _ in range(count)]
    try:
        yield
    finally:
        for conn in conns:
            await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def exhausted() -> AsyncIterator[Exhausted]:
    async with contextlib.AsyncExitStack() as stack:
        pg = await stack.enter_async_context(running_cluster({"max_connections": MAX_CONNECTIONS}))
        user, password = await stack.enter_async_context(stats_reader_role(pg.dsn()))
        # Given every ordinary slot held by checkout-api (idle, and idle in transaction) ...
        await stack.enter_async_context(_idle(pg.dsn(), IDLE, APP))
        await stack.enter_async_context(idle_in_transaction(pg.dsn(), IDLE_IN_TX, application_name=APP))
        # ... and the exporter (a superuser: it gets a reserved slot) reporting to Prometheus
        wd = Path(stack.enter_context(workdir("exporter-fallback")))
        (wd / "exporter").mkdir()
        (wd / "prometheus").mkdir()
        exp = PostgresExporter(wd / "exporter", pg.dsn())
        await stack.enter_async_context(running(exp))
        prom = Prometheus(wd / "prometheus", scrape_self=False, scrape_configs=[
            {"job_name": "postgres", "static_configs": [{"targets": [exp.target]}]}])
        await stack.enter_async_context(running(prom))
        await prom.wait_for_series(f'sum(pg_stat_activity_count{{state="idle"}}) >= {IDLE}', timeout=60)
        await prom.wait_for_series(f'sum(pg_stat_activity_count{{state="idle in transaction"}}) >= {IDLE_IN_TX}',
                                   timeout=60)
        await prom.wait_for_series('pg_stat_activity_max_tx_duration{state="idle in transaction"} > 0', timeout=60)
        yield Exhausted(pg, prom, exp, user, password)


def incident(**labels: str) -> IncidentEvent:
    all_labels = {"alertname": "CheckoutDbSlotsGone", "severity": "critical", **labels}
    alert = Alert(status=AlertStatus.FIRING, labels=all_labels, annotations={}, starts_at=utcnow())
    return IncidentEvent(source="http://alertmanager:9093", group_key='{}:{alertname="CheckoutDbSlotsGone"}',
                         status=AlertStatus.FIRING, alerts=(alert,), common_labels=all_labels)


@pytest_asyncio.fixture(loop_scope="session")
async def tools(exhausted: Exhausted) -> AsyncIterator[dict]:
    pg = PostgresTool(exhausted.pg.address, user=exhausted.user, password=exhausted.password,
                      limits=Limits(timeout=5), application_name="agentjobs-agent exporter-fallback")
    prom = PrometheusTool(exhausted.prometheus.url, limits=Limits(timeout=5))
    yield {"postgres": pg, "prometheus": prom}
    await pg.close()
    await prom.close()


async def test_the_agents_role_is_refused_and_the_exporter_answers_the_connections_question(exhausted, tools):
    inv = Investigation(incident=incident(instance=exhausted.exporter.target, job="postgres"), tools=tools,
                        phase=Phase.READ_ONLY)
    # When the agent asks PostgreSQL itself
    direct = await inv.call("postgres", "connections", {})

    # Then it is refused for want of a slot — a refusal, not an answer
    assert not direct.ok and "remaining connection slots are reserved" in direct.excerpt
    assert exporter.refused(direct)

    # And the exporter's metrics answer the same question, in the tool's shape, naming their source
    obs = await exporter.connections(inv, inv.incident.common_labels, direct.excerpt)
    assert obs is not None, [(o.query, o.excerpt) for o in inv.observations]
    assert (obs.tool, obs.operation, obs.ok) == ("prometheus", "query", True)
    assert "pg_stat_activity_count" in obs.query and f'instance="{exhausted.exporter.target}"' in obs.query
    assert obs.excerpt.startswith("answered from postgres-exporter metrics in Prometheus because postgres "
                                  "refused: ")
    assert "remaining connection slots are reserved" in obs.excerpt
    data = obs.data
    assert data["source"] == "postgres-exporter" and data["max_connections"] == MAX_CONNECTIONS
    assert data["superuser_reserved_connections"] == 3
    assert data["by_state"]["idle"] >= IDLE and data["by_state"]["idle in transaction"] == IDLE_IN_TX
    assert data["total"] >= IDLE + IDLE_IN_TX
    assert data["by_application"] == []  # Debian's exporter (0.11) has no application_name label
    # what the rules reasoner reads from it
    conn = read_connections(obs)
    assert conn is not None and conn.max_connections == MAX_CONNECTIONS
    assert conn.total / conn.max_connections >= 0.7


async def test_without_identifying_labels_the_postgres_tools_own_server_selects_the_series(exhausted, tools):
    # Given an alert that names only its database
    inv = Investigation(incident=incident(datname="postgres"), tools=tools, phase=Phase.READ_ONLY)
    obs = await exporter.connections(inv, inv.incident.common_labels, "sorry, too many clients already")

    assert obs is not None and obs.data["series"]["server"] == f"127.0.0.1:{exhausted.pg.port}"
    assert obs.data["by_state"]["idle in transaction"] == IDLE_IN_TX


async def test_long_transactions_come_from_the_exporters_max_tx_duration(exhausted, tools):
    inv = Investigation(incident=incident(job="postgres"), tools=tools, phase=Phase.READ_ONLY)
    obs = await exporter.long_transactions(inv, inv.incident.common_labels, "timed out after 5 s")

    assert obs is not None and obs.tool == "prometheus" and "pg_stat_activity_max_tx_duration" in obs.query
    rows = obs.data["rows"]
    assert rows and rows[0]["state"] == "idle in transaction" and rows[0]["max_tx_duration_s"] > 0
    assert "because postgres refused: timed out after 5 s" in obs.excerpt


async def test_no_series_for_the_alerts_server_is_no_answer(tools):
    inv = Investigation(incident=incident(server="db-nowhere:5432"), tools={"prometheus": tools["prometheus"]},
                        phase=Phase.READ_ONLY)
    assert await exporter.connections(inv, inv.incident.common_labels, "connection refused") is None


async def test_without_prometheus_there_is_no_fallback(tools):
    inv = Investigation(incident=incident(), tools={"postgres": tools["postgres"]}, phase=Phase.READ_ONLY)
    assert await exporter.connections(inv, {}, "connection refused") is None
    assert await exporter.long_transactions(inv, {}, "connection refused") is None
