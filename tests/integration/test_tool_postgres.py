"""The ``postgres`` tool against the machine's PostgreSQL with induced states.

The tool connects as a role that has only LOGIN and ``pg_read_all_stats`` —
what the agent's dynamic Vault user has — so every diagnostic is shown to work
with exactly that privilege. Application names carry a random suffix because
the cluster is shared with other tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest
import pytest_asyncio

from agent.tools.base import Limits
from agent.tools.postgres import PostgresTool, mask_query
from tests.support.observability import (
    HangingServer,
    blocking_chain,
    idle_in_transaction,
    long_running_query,
    stats_reader_role,
)
from tests.support.services import free_port, temporary_database, unique_name

pytestmark = pytest.mark.integration


@dataclass
class Db:
    admin_dsn: str  # superuser, the fresh database
    dsn: str  # the fresh database, no credentials (the tool gets user/password separately)
    user: str  # LOGIN + pg_read_all_stats only
    password: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(postgres) -> AsyncIterator[Db]:
    async with (
        temporary_database(postgres, hint="tools") as (dbname, admin_dsn),
        stats_reader_role(postgres.dsn) as (user, password),
    ):
        yield Db(admin_dsn, f"postgresql://127.0.0.1:{postgres.port}/{dbname}", user, password)


@pytest_asyncio.fixture(loop_scope="session")
async def tool(db: Db) -> AsyncIterator[PostgresTool]:
    pg = PostgresTool(db.dsn, user=db.user, password=db.password, limits=Limits(timeout=5, max_rows=200),
                      application_name="agentjobs-agent test")
    yield pg
    await pg.close()


async def test_connections_are_counted_by_state_application_and_client_against_max_connections(db, tool):
    app, other = unique_name("checkout-api"), unique_name("billing-api")
    # Given eight sessions of one application idle in transaction and two idle ones of another
    async with (
        idle_in_transaction(db.admin_dsn, 8, application_name=app),
        _idle_sessions(db.admin_dsn, 2, other),
    ):
        obs = await tool.run("connections", {})

    assert obs.ok, obs.excerpt
    data = obs.data
    assert data["max_connections"] == await _setting(db.admin_dsn, "max_connections")
    assert data["total"] >= 10 and data["usage_ratio"] == round(data["total"] / data["max_connections"], 4)
    assert data["by_state"]["idle in transaction"] >= 8
    apps = {a["application_name"]: a for a in data["by_application"]}
    assert (apps[app]["total"], apps[app]["idle_in_transaction"], apps[app]["active"]) == (8, 8, 0)
    assert (apps[other]["total"], apps[other]["idle"], apps[other]["idle_in_transaction"]) == (2, 2, 0)
    assert apps[app]["oldest_idle_in_transaction_s"] >= 0
    assert {c["client_addr"] for c in data["by_client"]} >= {"127.0.0.1"}
    assert data["oldest_idle_in_transaction_s"] >= apps[app]["oldest_idle_in_transaction_s"]
    assert f"{app} 8 (active 0, idle 0, idle in transaction 8)" in obs.excerpt
    assert "max_connections" in obs.excerpt and "pg_stat_activity" in obs.query


async def test_the_agents_own_sessions_are_left_out_of_the_counts_and_reported(db, tool):
    app = unique_name("orders-api")
    dbname = db.dsn.rsplit("/", 1)[1]
    # Given three sessions of an application, the tool's own session and another agent's, all on one database
    other_agent = PostgresTool(db.dsn, user=db.user, password=db.password, application_name="agentjobs-agent other")
    try:
        assert (await other_agent.run("connections", {})).ok  # its session stays open (idle)
        async with _idle_sessions(db.admin_dsn, 3, app):
            obs = await tool.run("connections", {})
    finally:
        await other_agent.close()

    # Then only the application's sessions count there; the agents' two are reported as left out
    assert obs.ok, obs.excerpt
    by_db = {d["datname"]: d["total"] for d in obs.data["by_database"]}
    assert by_db[dbname] == 3
    assert not [a for a in obs.data["by_application"] if a["application_name"].startswith("agentjobs-agent")]
    assert obs.data["excluded_own"] >= 2
    assert f"{obs.data['excluded_own']} agent sessions of our own not counted" in obs.excerpt


async def test_every_answer_names_the_target_that_answered(db):
    pg = PostgresTool(db.dsn, user=db.user, password=db.password, target="orders")
    try:
        obs = await pg.run("connections", {})
    finally:
        await pg.close()

    host_db = db.dsn.split("://", 1)[1]
    assert obs.ok and obs.query.startswith(f"-- postgres target orders ({host_db})\n")
    assert obs.data["target"] == "orders" and f"on target orders ({host_db})" in obs.excerpt


async def test_idle_in_transaction_lists_sessions_with_application_client_age_and_query(db, tool):
    app = unique_name("checkout-api")
    async with idle_in_transaction(db.admin_dsn, 5, application_name=app) as pids:
        obs = await tool.run("idle_in_transaction", {"min_age_s": 0})
        old_only = await tool.run("idle_in_transaction", {"min_age_s": 3600})

    assert obs.ok, obs.excerpt
    ours = [s for s in obs.data["sessions"] if s["application_name"] == app]
    assert sorted(s["pid"] for s in ours) == sorted(pids)
    assert obs.data["by_application"][app] == 5
    for s in ours:
        assert s["client_addr"] == "127.0.0.1" and s["state"] == "idle in transaction"
        assert s["xact_age_s"] >= s["idle_s"] >= 0 and s["query"] == "SELECT 1" and s["wrote"] is False
    assert f"{app}=5" in obs.excerpt
    assert old_only.ok and app not in old_only.data["by_application"]


async def test_at_most_max_rows_sessions_are_listed_and_the_total_is_kept(db):
    app = unique_name("checkout-api")
    pg = PostgresTool(db.dsn, user=db.user, password=db.password, limits=Limits(max_rows=3))
    try:
        async with idle_in_transaction(db.admin_dsn, 6, application_name=app):
            obs = await pg.run("idle_in_transaction", {})
    finally:
        await pg.close()

    assert obs.ok and obs.truncated
    assert len(obs.data["sessions"]) == 3 and obs.data["total"] >= 6


async def test_long_running_queries_are_listed_with_their_runtime(db, tool):
    app = unique_name("report-job")
    async with long_running_query(db.admin_dsn, db.admin_dsn, application_name=app) as pid:
        obs = await tool.run("long_running", {"min_s": 0})
        none = await tool.run("long_running", {"min_s": 3600})

    assert obs.ok, obs.excerpt
    (ours,) = [s for s in obs.data["sessions"] if s["pid"] == pid]
    assert ours["application_name"] == app and "pg_sleep" in ours["query"] and ours["running_s"] >= 0
    assert ours["wait_event"] == "PgSleep"
    assert all(s["application_name"] != "agentjobs-agent test" for s in obs.data["sessions"])  # not itself
    assert none.ok and pid not in [s["pid"] for s in none.data["sessions"]]


async def test_a_blocking_chain_names_the_root_blocker_and_who_waits_on_it(db, tool):
    holder_app, waiter_app = unique_name("orders-batch"), unique_name("checkout-api")
    # Given A holds a row lock in an open transaction, and B and C update the same row
    async with blocking_chain(db.admin_dsn, db.admin_dsn, holder_app=holder_app, waiter_app=waiter_app,
                              waiters=2) as chain:
        obs = await tool.run("blocking_chains", {})

    assert obs.ok, obs.excerpt
    blocked = {b["pid"]: b for b in obs.data["blocked"]}
    assert set(chain.waiter_pids) <= set(blocked)
    first = blocked[chain.waiter_pids[0]]
    assert chain.holder_pid in first["blocked_by"]
    assert first["application_name"] == waiter_app and "UPDATE" in first["query"] and first["lock_wait_s"] >= 0
    # Then A is the root, idle in transaction, blocking both
    assert chain.holder_pid in obs.data["roots"]
    (root,) = [b for b in obs.data["blockers"] if b["pid"] == chain.holder_pid]
    assert root["application_name"] == holder_app and root["state"] == "idle in transaction"
    assert root["blocks_total"] == 2 and root["waiting"] is False and root["wrote"] is True
    assert f"blocker pid {chain.holder_pid} {holder_app}" in obs.excerpt


async def test_the_session_is_read_only_bounded_and_named(db, tool):
    conn = await tool._connection()
    cur = await conn.execute("SELECT current_setting('default_transaction_read_only'), "
                             "current_setting('statement_timeout'), current_setting('application_name'), "
                             "current_user")
    assert await cur.fetchone() == ("on", "5s", "agentjobs-agent test", db.user)
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        await conn.execute("CREATE TABLE agent_must_not_write (x int)")
    await tool.close()  # the failed statement's connection is thrown away
    assert (await tool.run("connections", {})).ok  # and a new one is opened on the next call


async def test_password_literals_in_other_sessions_queries_are_masked(db, tool):
    role = unique_name("tmp_role").replace("-", "_")
    async with await psycopg.AsyncConnection.connect(db.admin_dsn, application_name=unique_name("admin")) as admin:
        await admin.execute(f"CREATE ROLE {role}")
        await admin.execute(f"ALTER ROLE {role} PASSWORD 'hunter2-very-secret'")  # then idle in transaction
        obs = await tool.run("idle_in_transaction", {})
        await admin.rollback()

    assert obs.ok
    (ours,) = [s for s in obs.data["sessions"] if role in s["query"]]
    assert "hunter2" not in ours["query"] and "PASSWORD '******'" in ours["query"]
    assert "hunter2" not in obs.excerpt
    assert mask_query("ALTER USER x WITH PASSWORD 'a''b' VALID UNTIL 'x'") == \
        "ALTER USER x WITH PASSWORD '******' VALID UNTIL 'x'"


async def test_failures_are_observations_and_never_show_the_password(db):
    secret = "pw-never-shown-1234"
    cases = [
        PostgresTool(f"postgresql://127.0.0.1:{free_port()}/x", user="agent", password=secret,
                     limits=Limits(timeout=2)),
        PostgresTool(db.dsn.rsplit("/", 1)[0] + "/no_such_database", user=db.user, password=secret),
        PostgresTool(f"postgresql://agent:{secret}@127.0.0.1:{free_port()}/x", limits=Limits(timeout=2)),
    ]
    observations = []
    for pg in cases:
        try:
            observations.append(await pg.run("connections", {}))
        finally:
            await pg.close()
    for obs in observations:
        assert not obs.ok and obs.data is None and obs.excerpt
        assert secret not in obs.excerpt and secret not in obs.query
    assert 'database "no_such_database" does not exist' in observations[1].excerpt
    # the reason is whole, never cut mid-word (summaries cut it themselves, at a word boundary)
    assert not observations[0].excerpt.endswith("…") and "Connection refused" in observations[0].excerpt


async def test_a_server_that_never_answers_is_bounded_by_the_timeout():
    async with HangingServer() as hanging:
        pg = PostgresTool(f"postgresql://127.0.0.1:{hanging.port}/x", user="agent", password="pw-xyz-123",
                          limits=Limits(timeout=0.5))
        try:
            obs = await pg.run("connections", {})
        finally:
            await pg.close()

    assert not obs.ok and "timed out after 0.5 s" in obs.excerpt


async def test_invalid_parameters_and_unknown_operations_are_failed_observations(tool):
    assert "invalid" in (await tool.run("idle_in_transaction", {"min_age_s": "soon"})).excerpt
    assert "unknown operation" in (await tool.run("terminate", {})).excerpt


# --------------------------------------------------------------------------- #


async def _setting(dsn: str, name: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT current_setting(%s)::int", (name,))
        row = await cur.fetchone()
    return int(row[0])


@contextlib.asynccontextmanager
async def _idle_sessions(dsn: str, count: int, application_name: str) -> AsyncIterator[None]:
    conns = [await psycopg.AsyncConnection.connect(dsn, application_name=application_name, autocommit=True)
             for _ in range(count)]
    try:
        yield
    finally:
        for conn in conns:
            await conn.close()
