"""Real PostgreSQL problems, each on a private PostgreSQL 15 cluster of its own.

Why a cluster each: ``pg_stat_activity`` is server-wide, so two problems on one server would be one
incident with two causes (and the machine's shared server carries other tests' sessions). A private
cluster starts in under a second. The agent connects as a role with only LOGIN and
``pg_read_all_stats``, like its Vault-issued user; the workloads as an ordinary role ``app``.

The rules count a session idle in transaction, a long-running query or a long lock wait only from
30 s on (``agent/reasoning/rules.py``), as an SRE would: each problem's ``settled`` waits until its
sessions are that old, and ``harness.induced`` runs those waits of a group concurrently.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.targets import DEFAULT, PostgresTarget, choose
from agent.tools.base import Limits, Tool
from agent.tools.postgres import PostgresTool
from agent.tools.prometheus import PrometheusTool
from schemas import IncidentEvent
from tests.scenarios.harness import Sources
from tests.support.observability import (
    PostgresExporter,
    Prometheus,
    blocking_chain,
    idle_in_transaction,
    long_running_query,
    running,
    stats_reader_role,
)
from tests.support.services import wait_until
from tests.support.two_am import PostgresCluster, running_cluster

SETTLE_S = 31  # sessions must be older than the rules' 30 s thresholds
SETTLE_TIMEOUT_S = 90
LIMITS = Limits(timeout=5, max_rows=50)
APP_ROLE = "app"


@contextlib.asynccontextmanager
async def database_server(*databases: str, settings: Mapping[str, str | int] | None = None
                          ) -> AsyncIterator[tuple[PostgresCluster, tuple[str, str]]]:
    """A private cluster with ``databases`` owned by the workload role, and the agent's stats role."""
    import psycopg

    async with running_cluster(settings) as pg:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
            for db in databases:
                await admin.execute(f"CREATE DATABASE {db} OWNER {APP_ROLE}")
        async with stats_reader_role(pg.dsn()) as agent_role:
            yield pg, agent_role


def postgres_tool(pg: PostgresCluster, role: tuple[str, str], dbname: str = "postgres", *,
                  target: str = "default") -> PostgresTool:
    """The agent's postgres tool on ``pg``, as its read-only role."""
    user, password = role
    return PostgresTool(f"postgresql://127.0.0.1:{pg.port}/{dbname}", user=user, password=password, limits=LIMITS,
                        target=target)


def older_than(pg: PostgresCluster, pids: Sequence[int], seconds: float = SETTLE_S, *,
               since: str = "xact_start") -> Any:
    """A ``settled`` wait: every pid's transaction (or query) has been open for ``seconds``."""
    import psycopg

    async def old_enough() -> bool:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            cur = await conn.execute(
                f"SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND now() - {since} >= make_interval("
                "secs => %s)", (list(pids), seconds))
            row = await cur.fetchone()
        return bool(row) and row[0] == len(pids)

    async def settled() -> None:
        await wait_until(old_enough, timeout=SETTLE_TIMEOUT_S, what=f"sessions {list(pids)} {seconds:g} s old",
                         max_delay=1.0)

    return settled


def _facts(pg: PostgresCluster, **more: str) -> dict[str, str]:
    return {"server": f"127.0.0.1:{pg.port}", "port": str(pg.port), **more}


@contextlib.asynccontextmanager
async def lock_chain(_: Any, *, holder_app: str = "orders-batch", waiter_app: str = "checkout-api",
                     database: str = "orders") -> AsyncIterator[Sources]:
    """A batch job updates a row and then sits idle in its transaction; checkout sessions queue behind it."""
    async with database_server(database) as (pg, role):
        async with blocking_chain(pg.dsn(APP_ROLE, database), pg.dsn(), holder_app=holder_app,
                                  waiter_app=waiter_app, waiters=3) as chain:
            async def tools() -> list[Tool]:
                return [postgres_tool(pg, role, database)]

            yield Sources(tools=tools, facts=_facts(pg, holder_pid=str(chain.holder_pid), table=chain.table),
                          settled=older_than(pg, [chain.holder_pid]))


@contextlib.asynccontextmanager
async def idle_holder(_: Any) -> AsyncIterator[Sources]:
    """One sync worker reads, then forgets to commit: a long transaction that blocks nobody yet."""
    async with database_server("billing") as (pg, role):
        async with idle_in_transaction(pg.dsn(APP_ROLE, "billing"), 1, application_name="invoice-sync") as pids:
            async def tools() -> list[Tool]:
                return [postgres_tool(pg, role, "billing")]

            yield Sources(tools=tools, facts=_facts(pg, holder_pid=str(pids[0])), settled=older_than(pg, pids))


@contextlib.asynccontextmanager
async def long_query(_: Any) -> AsyncIterator[Sources]:
    """A reporting job's query has been running for minutes (no locks involved)."""
    async with database_server("analytics") as (pg, role):
        async with long_running_query(pg.dsn(APP_ROLE, "analytics"), pg.dsn(), seconds=900,
                                      application_name="revenue-report") as pid:
            async def tools() -> list[Tool]:
                return [postgres_tool(pg, role, "analytics")]

            yield Sources(tools=tools, facts=_facts(pg, pid=str(pid)),
                          settled=older_than(pg, [pid], since="query_start"))


@contextlib.asynccontextmanager
async def second_database(_: Any) -> AsyncIterator[Sources]:
    """Two servers: the Job's default one is quiet; the ledger database on the other, named by the alert's
    ``datname`` label, has a month-end job holding a row lock that payments wait on."""
    async with (
        database_server("orders") as (quiet, quiet_role),
        database_server("ledger") as (busy, busy_role),
        blocking_chain(busy.dsn(APP_ROLE, "ledger"), busy.dsn(), holder_app="ledger-close",
                       waiter_app="payments-api", waiters=2) as chain,
    ):
        async def tools_for(incident: IncidentEvent) -> list[Tool]:
            return tools_for_targets(
                incident, default=(postgres_tool(quiet, quiet_role, "orders"), {}),
                targets={"ledger": (postgres_tool(busy, busy_role, "ledger", target="ledger"), {"datname": "ledger"})})

        yield Sources(tools=_unselected, tools_for=tools_for, facts=_facts(busy, holder_pid=str(chain.holder_pid)),
                      settled=older_than(busy, [chain.holder_pid]))


async def _unselected() -> list[Tool]:
    raise AssertionError("this problem's tools depend on the alert: Sources.tools_for")


def tools_for_targets(incident: IncidentEvent, *, default: tuple[PostgresTool, Mapping[str, str]],
                      targets: Mapping[str, tuple[PostgresTool, Mapping[str, str]]]) -> list[Tool]:
    """The postgres tool the Job would get: the target the alert's labels select (``agent.targets.choose``,
    as ``AGENTJOBS_POSTGRES__TARGETS`` configures it), each tool with its own target's role."""
    tools = {DEFAULT: default[0], **{name: tool for name, (tool, _) in targets.items()}}
    chosen = choose(incident, default=PostgresTarget(name=DEFAULT, dsn=default[0].dsn, match=dict(default[1])),
                    targets=[PostgresTarget(name=name, dsn=tool.dsn, match=dict(match))
                             for name, (tool, match) in targets.items()])
    return [tools[chosen.name]] if chosen.target is not None else []


WAL_ROWS = 800_000  # rows of ~400 bytes: ~370 MiB of WAL, beyond the rules' replication thresholds


async def _write_wal(pg: PostgresCluster, rows: int = WAL_ROWS) -> None:
    """The orders workload writing on the primary: a few hundred MiB of WAL in a second or two."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg.dsn(APP_ROLE, "orders"), autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS order_events (id bigint, payload text)")
        await conn.execute("INSERT INTO order_events SELECT g, repeat('x', 400) FROM generate_series(1, %s) g",
                           (rows,))


def _wal_at_least(pg: PostgresCluster, sql: str, nbytes: int, what: str) -> Any:
    import psycopg

    async def enough() -> bool:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            row = await (await conn.execute(sql)).fetchone()
        return bool(row) and row[0] is not None and row[0] >= nbytes

    async def settled() -> None:
        await wait_until(enough, timeout=SETTLE_TIMEOUT_S, what=what, max_delay=1.0)

    return settled


@contextlib.asynccontextmanager
async def replica_replay_paused(_: Any) -> AsyncIterator[Sources]:
    """The reports replica: replay was paused for a maintenance (pg_wal_replay_pause) and never resumed; the
    primary keeps writing, the replica keeps receiving, and every report reads older data."""
    import psycopg

    async with (
        database_server("orders") as (primary, role),
        running_cluster({"cluster_name": "reports-replica"}, standby_of=primary) as replica,
    ):
        async with await psycopg.AsyncConnection.connect(replica.dsn(), autocommit=True) as conn:
            await conn.execute("SELECT pg_wal_replay_pause()")
        await _write_wal(primary)

        async def tools() -> list[Tool]:
            return [postgres_tool(replica, role, "orders", target="reports-replica")]

        yield Sources(tools=tools, facts=_facts(replica), settled=_wal_at_least(
            replica, "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())",
            200 * 1048576, "the replica received 200 MiB it has not replayed"))


@contextlib.asynccontextmanager
async def slot_retains_wal(_: Any) -> AsyncIterator[Sources]:
    """A physical slot made for a backup host that was decommissioned: nothing consumes it, so the primary keeps
    every WAL segment since, and its disk fills."""
    import psycopg

    async with database_server("orders") as (pg, role):
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute("SELECT pg_create_physical_replication_slot('backup_host_b', true)")
        await _write_wal(pg)

        async def tools() -> list[Tool]:
            return [postgres_tool(pg, role, "orders")]

        yield Sources(tools=tools, facts=_facts(pg), settled=_wal_at_least(
            pg, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots",
            300 * 1048576, "the slot retains 300 MiB of WAL"))


MAX_CONNECTIONS = 10  # 3 of them superuser_reserved_connections: 7 ordinary slots
HOGS = MAX_CONNECTIONS - 3


@contextlib.asynccontextmanager
async def connections_exhausted(_: Any) -> AsyncIterator[Sources]:
    """Every ordinary connection slot held idle in transaction by checkout-api: the agent's own role is
    refused ("remaining connection slots are reserved ..."); postgres-exporter (superuser, a reserved
    slot) keeps reporting to Prometheus."""
    import psycopg

    with tempfile.TemporaryDirectory(prefix="agentjobs-scenario-exhaustion-") as tmp:
        work = Path(tmp)
        async with database_server("checkout", settings={"max_connections": MAX_CONNECTIONS}) as (pg, role):
            (work / "exporter").mkdir()
            (work / "prometheus").mkdir()
            exporter = PostgresExporter(work / "exporter", pg.dsn())
            # The hogs first: a superuser takes an ordinary slot while there is one, a reserved one after.
            async with (
                idle_in_transaction(pg.dsn(APP_ROLE, "checkout"), HOGS, application_name="checkout-api") as pids,
                running(exporter),
            ):
                prometheus = Prometheus(work / "prometheus", scrape_configs=[
                    {"job_name": "postgres", "static_configs": [{"targets": [exporter.target],
                                                                 "labels": {"server": f"127.0.0.1:{pg.port}"}}]}])
                async with running(prometheus):
                    async def exhausted() -> None:
                        # Prometheus has seen the sessions, and the agent's role really is refused now.
                        await prometheus.wait_for_series(
                            f'sum(pg_stat_activity_count{{state="idle in transaction"}}) >= {HOGS}', timeout=60)
                        try:
                            conn = await psycopg.AsyncConnection.connect(
                                f"postgresql://{role[0]}@127.0.0.1:{pg.port}/postgres", connect_timeout=3)
                        except psycopg.OperationalError:
                            return
                        await conn.close()
                        raise RuntimeError("the agent's role still got a connection: slots not exhausted")

                    async def tools() -> list[Tool]:
                        return [postgres_tool(pg, role, "checkout"), PrometheusTool(prometheus.url, limits=LIMITS)]

                    yield Sources(tools=tools, facts=_facts(pg, hogs=str(len(pids))), settled=exhausted,
                                  prometheus_url=prometheus.url)
