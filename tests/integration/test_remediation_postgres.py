"""The PostgreSQL executors against the machine's PostgreSQL: a real lock pile-up, really resolved.

Roles are made by the test with random names, none a superuser: the application's
(``app``: holds the row lock, and its 10 waiters), the remediation phases' agent user
(``agent``: LOGIN, ``pg_read_all_stats``, ``pg_signal_backend``) and the read-only
phase's (``reader``: LOGIN, ``pg_read_all_stats`` only). The executor and the tool
connect as the agent's user, never as the superuser, which only stages and observes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from agent import config, engine
from agent.reasoning import Tally
from agent.remediation.postgres import Database, TerminateBackend, TerminateIdleBackends
from agent.remediation.protocol import FileLedger, MemoryLedger, Outcome, execute
from schemas import Phase, ProposedAction, RiskClass
from tests.support.fake_tools import incident
from tests.support.observability import idle_in_transaction, wait_for_activity
from tests.support.services import temporary_database, unique_name, wait_until

pytestmark = pytest.mark.integration

WAITERS = 10
UNDO = "none (a terminated session cannot be restored; its transaction was rolled back)"
LOCK_ALERT = 'sum(pg_locks_count{mode=~".*ExclusiveLock"}) > 10'


@dataclass
class Db:
    admin_dsn: str  # superuser: stages and observes only
    address: str  # the database without credentials, as the Job gets it
    app: str  # the application's role
    agent: str  # the remediation phases' role: pg_read_all_stats + pg_signal_backend
    reader: str  # the read-only phase's role: pg_read_all_stats only
    password: str = "pw-unused-trust-auth"

    def dsn(self, user: str) -> str:
        return self.address.replace("postgresql://", f"postgresql://{user}@", 1)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def db(postgres) -> AsyncIterator[Db]:
    tag = secrets.token_hex(4)
    roles = {"app": f"app_{tag}", "agent": f"agent_{tag}", "reader": f"reader_{tag}"}
    async with temporary_database(postgres, hint="remediation") as (dbname, admin_dsn):
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
            await admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(roles["app"])))
            await admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE pg_read_all_stats, pg_signal_backend").format(
                sql.Identifier(roles["agent"])))
            await admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE pg_read_all_stats").format(
                sql.Identifier(roles["reader"])))
        try:
            yield Db(admin_dsn=admin_dsn, address=f"postgresql://127.0.0.1:{postgres.port}/{dbname}", **roles)
        finally:
            async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
                for role in roles.values():
                    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                                        (role,))
            await postgres.drop_database(dbname)
            async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
                for role in roles.values():
                    await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@dataclass
class Chain:
    holder: Any  # the application's connection holding the row lock, idle in transaction
    holder_pid: int
    holder_app: str
    waiter_pids: list[int] = field(default_factory=list)
    waiters: list[asyncio.Task[Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def lock_pileup(db: Db, waiters: int = WAITERS) -> AsyncIterator[Chain]:
    """The application's batch updates a row and forgets its transaction; ``waiters`` checkouts update it too."""
    table = f"stock_{secrets.token_hex(3)}"
    async with await psycopg.AsyncConnection.connect(db.admin_dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)")
        await admin.execute(f"INSERT INTO {table} VALUES (1, 100)")
        await admin.execute(sql.SQL("GRANT ALL ON {} TO {}").format(sql.Identifier(table), sql.Identifier(db.app)))
    holder_app, waiter_app = unique_name("orders-batch"), unique_name("checkout-api")
    holder = await psycopg.AsyncConnection.connect(db.dsn(db.app), application_name=holder_app)
    conns: list[Any] = []
    chain = Chain(holder=holder, holder_pid=holder.info.backend_pid, holder_app=holder_app)
    try:
        await holder.execute(f"UPDATE {table} SET n = n - 1 WHERE id = 1")  # row lock held, transaction open
        for _ in range(waiters):
            conn = await psycopg.AsyncConnection.connect(db.dsn(db.app), application_name=waiter_app, autocommit=True)
            conns.append(conn)
            chain.waiter_pids.append(conn.info.backend_pid)
            chain.waiters.append(asyncio.create_task(conn.execute(f"UPDATE {table} SET n = n - 1 WHERE id = 1")))
        await wait_for_activity(db.admin_dsn, "pid = ANY(%s) AND wait_event_type = 'Lock'", [chain.waiter_pids],
                                waiters)
        yield chain
    finally:
        async with await psycopg.AsyncConnection.connect(db.admin_dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                                ([chain.holder_pid, *chain.waiter_pids],))
        for task in chain.waiters:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=5)
        for conn in (holder, *conns):
            with contextlib.suppress(Exception):
                await conn.close()
        async with await psycopg.AsyncConnection.connect(db.admin_dsn, autocommit=True) as admin:
            await admin.execute(f"DROP TABLE IF EXISTS {table}")


async def alive(db: Db, pids: list[int]) -> set[int]:
    async with await psycopg.AsyncConnection.connect(db.admin_dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        return {row[0] for row in await cur.fetchall()}


async def session_of(db: Db, pid: int) -> tuple[str, str, Any]:
    async with await psycopg.AsyncConnection.connect(db.admin_dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT usename::text, application_name, backend_start FROM pg_stat_activity "
                                  "WHERE pid = %s", (pid,))
        row = await cur.fetchone()
    assert row is not None
    return row


async def terminate_action(db: Db, chain: Chain, **params: str) -> ProposedAction:
    user, app, start = await session_of(db, chain.holder_pid)
    base = {"pid": str(chain.holder_pid), "application_name": app, "usename": user,
            "backend_start": start.isoformat()}
    return ProposedAction(action="terminate_backend", target=f"pid {chain.holder_pid}", risk=RiskClass.MEDIUM,
                          params={**base, **params})


@pytest_asyncio.fixture(loop_scope="session")
async def agent_db(db: Db) -> AsyncIterator[Database]:
    database = Database(db.address, user=db.agent, password=db.password, timeout=5,
                        application_name="agentjobs-agent test remediation")
    yield database
    await database.close()


async def waiters_proceed(chain: Chain) -> None:
    done, pending = await asyncio.wait(chain.waiters, timeout=10)
    assert not pending, f"{len(pending)} of {len(chain.waiters)} waiters still wait"
    assert all(t.exception() is None for t in done)


# --- the executor through the protocol -----------------------------------------------------------

async def test_the_root_blocker_is_terminated_verified_and_its_ten_waiters_proceed(db, agent_db):
    async with lock_pileup(db) as chain:
        action = await terminate_action(db, chain)
        result = await execute(action, TerminateBackend(agent_db), done=MemoryLedger(), investigation_id="inv-root")

        assert result.outcome is Outcome.EXECUTED_VERIFIED, result
        await waiters_proceed(chain)
        assert await alive(db, [chain.holder_pid]) == set()
        assert set(chain.waiter_pids) <= await alive(db, chain.waiter_pids)  # only the root was ended
        params = result.params()
        assert params["undo"] == UNDO
        assert f"pid {chain.holder_pid} (user {db.app}, application {chain.holder_app}, idle in transaction" \
            in params["before"] and f"blocked {WAITERS} session(s)" in params["before"]
        # (the waiters queue for the row one after another: when verified, some may still wait on each other)
        assert params["after"].startswith(f"pid {chain.holder_pid} is gone; 0 session(s) wait on it; of the "
                                          f"{WAITERS} it blocked, ")
        with pytest.raises(psycopg.OperationalError):  # the application sees its session terminated
            await chain.holder.execute("SELECT 1")


async def test_a_blocker_gone_before_acting_is_skipped_stale(db, agent_db):
    async with lock_pileup(db, waiters=3) as chain:
        action = await terminate_action(db, chain)
        await chain.holder.rollback()  # the batch finished on its own
        await waiters_proceed(chain)
        still_blocking = await execute(action, TerminateBackend(agent_db), done=MemoryLedger(),
                                       investigation_id="inv-gone")
        await chain.holder.close()
        await wait_until(lambda: _gone(db, chain.holder_pid), timeout=5, what="the holder's session ends")
        gone = await execute(action, TerminateBackend(agent_db), done=MemoryLedger(), investigation_id="inv-gone")

    assert still_blocking.outcome is Outcome.SKIPPED_STALE
    assert still_blocking.reason == f"pid {chain.holder_pid} no longer blocks any session"
    assert gone.outcome is Outcome.SKIPPED_STALE and gone.reason == f"pid {chain.holder_pid} no longer exists"
    assert not gone.executed and "undo" not in gone.params()


async def test_a_blocker_in_another_database_of_the_server_is_never_terminated(db):
    # The Job's database is another one on the same server (its allow-list names that one only)
    other = db.address.rsplit("/", 1)[0] + "/postgres"
    elsewhere = Database(other, user=db.agent, password=db.password, timeout=5,
                         application_name="agentjobs-agent test remediation")
    try:
        async with lock_pileup(db, waiters=3) as chain:
            action = await terminate_action(db, chain)
            result = await execute(action, TerminateBackend(elsewhere), done=MemoryLedger(),
                                   investigation_id="inv-elsewhere")
            assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
    finally:
        await elsewhere.close()
    assert result.outcome is Outcome.SKIPPED_STALE and not result.executed
    assert result.reason == f"pid {chain.holder_pid} no longer exists"


async def _gone(db: Db, pid: int) -> bool:
    return not await alive(db, [pid])


async def test_a_pid_that_is_no_longer_the_findings_session_is_skipped_stale(db, agent_db):
    async with lock_pileup(db, waiters=3) as chain:
        _, _, start = await session_of(db, chain.holder_pid)
        cases = {
            "other application": await terminate_action(db, chain, application_name="reporting"),
            "other user": await terminate_action(db, chain, usename="postgres"),
            # the same pid, but the finding saw a session that started earlier: reused
            "other backend_start": await terminate_action(db, chain, backend_start=(
                start.replace(microsecond=0) if start.microsecond else start.replace(microsecond=1)).isoformat()),
            # observed 5 minutes ago with a transaction then 60 s old: the one there now is younger
            "newer session": await terminate_action(db, chain, backend_start="", observed_at=(
                (start - _minutes(5)).isoformat()), xact_age_s="60"),
        }
        results = {name: await execute(a, TerminateBackend(agent_db), done=MemoryLedger(), investigation_id="inv-x")
                   for name, a in cases.items()}
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}  # left alone

    assert {n: r.outcome for n, r in results.items()} == {n: Outcome.SKIPPED_STALE for n in cases}
    assert "now belongs to application" in results["other application"].reason
    assert "now belongs to user" in results["other user"].reason
    assert "the pid was reused" in results["other backend_start"].reason
    assert "after the finding observed it" in results["newer session"].reason


def _minutes(n: int) -> Any:
    from datetime import timedelta

    return timedelta(minutes=n)


async def test_run_twice_with_the_same_ledger_acts_once(db, agent_db, tmp_path: Path):
    path = tmp_path / "agentjobs-actions.jsonl"
    async with lock_pileup(db, waiters=3) as chain:
        action = await terminate_action(db, chain)
        first = await execute(action, TerminateBackend(agent_db), done=FileLedger(path), investigation_id="inv-twice")
        # a restarted agent process: new executor, new ledger object, same file
        second = await execute(action, TerminateBackend(agent_db), done=FileLedger(path),
                               investigation_id="inv-twice")
        await waiters_proceed(chain)

    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.key == first.key and second.executed
    assert second.params()["previous_outcome"] == "executed_verified"
    assert len(path.read_text().splitlines()) == 2  # one claim, one outcome


async def test_a_role_without_pg_signal_backend_cannot_terminate_even_past_the_gate(db):
    reader = Database(db.address, user=db.reader, password=db.password, timeout=5)
    try:
        async with lock_pileup(db, waiters=3) as chain:
            action = await terminate_action(db, chain)
            result = await execute(action, TerminateBackend(reader), done=MemoryLedger(), investigation_id="inv-ro")
            # and called directly, PostgreSQL refuses it too
            async with await psycopg.AsyncConnection.connect(db.dsn(db.reader), autocommit=True) as conn:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    await conn.execute("SELECT pg_terminate_backend(%s)", (chain.holder_pid,))
            assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
    finally:
        await reader.close()

    assert result.outcome is Outcome.FAILED and not result.executed
    assert "InsufficientPrivilege" in result.params()["error"] and "pg_signal_backend" in result.params()["error"]


async def test_idle_sessions_of_one_application_are_terminated_and_others_left_alone(db, agent_db):
    app, other = unique_name("checkout-api"), unique_name("billing-api")
    async with (idle_in_transaction(db.dsn(db.app), 4, application_name=app) as pids,
                idle_in_transaction(db.dsn(db.app), 2, application_name=other) as others):
        await asyncio.sleep(1.2)
        action = ProposedAction(action="terminate_idle_backends", target=f"application_name {app}",
                                risk=RiskClass.MEDIUM, params={"application_name": app, "min_idle_s": "1"})
        result = await execute(action, TerminateIdleBackends(agent_db), done=MemoryLedger(), investigation_id="inv-i")
        left = await alive(db, [*pids, *others])
        stale = await execute(action, TerminateIdleBackends(agent_db), done=MemoryLedger(), investigation_id="inv-i")

    assert result.outcome is Outcome.EXECUTED_VERIFIED, result
    assert left == set(others)
    assert result.params()["after"] == f"4 of the 4 terminated sessions are gone; 0 sessions of application_name " \
                                       f"{app!r} idle in transaction for >= 1 s now"
    assert result.params()["undo"].startswith("none (")
    assert stale.outcome is Outcome.SKIPPED_STALE and "no sessions of application_name" in stale.reason


# --- the whole agent path: investigate → conclude → gate → executor -------------------------------

def granted(dsn: str) -> dict[str, str]:
    """What the dispatcher grants a Job that may act once on its own database (``[actions]``)."""
    import json
    from urllib.parse import urlsplit

    return {"AGENTJOBS_ACTIONS__ALLOWANCE": "1",
            "AGENTJOBS_ACTIONS__DATABASES": json.dumps([urlsplit(dsn).path.lstrip("/") or "postgres"])}


def agent_env(db: Db, phase: Phase, tmp_path: Path, investigation_id: str) -> config.AgentEnv:
    return config.load({"AGENTJOBS_INVESTIGATION_ID": investigation_id, "AGENTJOBS_PHASE": phase.value,
                        "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/",
                        "AGENTJOBS_VAULT__AUTH_MODE": "none", "AGENTJOBS_POSTGRES__DSN": db.address,
                        "AGENTJOBS_TOOLS__RABBITMQ": "false", "TMPDIR": str(tmp_path), **granted(db.address)})


async def investigate(db: Db, env: config.AgentEnv, user: str) -> Any:
    tools, unavailable = await engine.open_tools(env, db_user=user, db_password=db.password, postgres_available=True)
    assert [t.name for t in tools] == ["postgres"] and unavailable == []
    try:
        return await engine.investigate(incident("PostgresLockWaits", expr=LOCK_ALERT, instance="pg-0:9187"), env,
                                        tools=tools, tally=Tally())
    finally:
        await engine.close_tools(tools)


async def test_autonomous_the_agent_terminates_the_root_blocker_and_says_so_in_the_finding(db, tmp_path: Path):
    env = agent_env(db, Phase.AUTONOMOUS, tmp_path, "inv-autonomous")
    async with lock_pileup(db) as chain:
        finding = await investigate(db, env, db.agent)
        await waiters_proceed(chain)
        assert await alive(db, [chain.holder_pid]) == set()

    assert finding.hypotheses[0].cause == "lock_contention"
    [action] = [a for a in finding.proposed_actions if a.action == "terminate_backend"]
    assert action.executed
    p = action.params
    assert (p["pid"], p["application_name"], p["usename"]) == (str(chain.holder_pid), chain.holder_app, db.app)
    assert "observed_at" in p and "xact_age_s" in p  # what the precondition re-checked
    assert (p["decision"], p["outcome"], p["undo"]) == ("execute", "executed_verified", UNDO)
    assert p["reason"].startswith("executed and verified")
    assert f"blocked {WAITERS} session(s)" in p["before"] and "is gone; 0 session(s) wait on it" in p["after"]
    # the key is in the Job's ledger (a restarted process would answer already_executed)
    ledger = FileLedger(env.action_ledger_file)
    assert ledger.seen(p["idempotency_key"]).outcome is Outcome.EXECUTED_VERIFIED


@pytest.mark.parametrize("phase", [Phase.READ_ONLY, Phase.LIMITED_REMEDIATION])
async def test_below_autonomous_the_blocker_is_only_proposed_and_stays_alive(db, tmp_path: Path, phase: Phase):
    env = agent_env(db, phase, tmp_path, f"inv-{phase.value}")
    user = db.reader if phase is Phase.READ_ONLY else db.agent
    async with lock_pileup(db, waiters=3) as chain:
        finding = await investigate(db, env, user)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
        assert all(not t.done() for t in chain.waiters)

    [action] = [a for a in finding.proposed_actions if a.action == "terminate_backend"]
    assert not action.executed and action.params["pid"] == str(chain.holder_pid)
    assert action.params["decision"] == "propose_only" and "outcome" not in action.params
    assert "not medium-risk actions: proposed only" in action.params["reason"]
    assert not env.action_ledger_file.exists()  # nothing was even claimed


async def test_the_executor_frees_the_tools_slot_before_taking_its_own(db):
    calls: list[str] = []

    async def close_tool() -> None:
        calls.append("tool closed")

    database = Database(db.address, user=db.agent, password=db.password, before_connect=close_tool)
    try:
        assert await database.rows("SELECT current_user::text, current_setting('transaction_read_only')", {}) == [
            (db.agent, "on")]
        await database.close()
        await database.rows("SELECT 1", {})  # reconnecting does not close the tool again
    finally:
        await database.close()

    assert calls == ["tool closed"]
