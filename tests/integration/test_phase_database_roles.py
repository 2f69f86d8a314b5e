"""Each phase's database user, from Vault, against real PostgreSQL and OpenBao (issue 18).

The second layer besides the action gate: only the phases that may act (limited-remediation,
autonomous) get a database user that is a member of ``pg_signal_backend``; a shadow or read-only
Job cannot terminate a backend even when it calls ``pg_terminate_backend`` directly, and cannot
even obtain the remediation role's credentials. Tokens are minted as the dispatcher mints them
(``VaultCredentials.mint``, response-wrapped through the phase's token role) and used by the
agent's own code (``agent.credentials.start`` with the Job's ``AGENTJOBS_PHASE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from agent import config as agent_config
from agent import credentials
from agent.credentials import Denied, DynamicSecret, VaultSession
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.plumbing.settings import load_settings
from schemas import Phase
from schemas import vault_paths as layout
from tests.integration.vault_helpers import Vault, bootstrapped_vault
from tests.support.services import Postgres, RabbitMQ, Vhost, wait_until

pytestmark = pytest.mark.integration

ACTING = (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS)
GONE_WITHIN = 10.0  # seconds
# SQLSTATE 42501 (insufficient_privilege) either way; the text changed in PostgreSQL 16:
# "permission denied to terminate process" there, "must be a member of the role whose process is
# being terminated or member of pg_signal_backend" (or "must be a superuser to terminate superuser
# process") in 15 and older.
DENIED = r"permission denied|must be a member of the role|must be a superuser"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vault(postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost) -> AsyncIterator[Vault]:
    """A fresh OpenBao, bootstrapped (both database roles), and a dispatcher token."""
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        yield vault


@contextlib.asynccontextmanager
async def agent_session(vault: Vault, phase: Phase, tmp_path: Path) -> AsyncIterator[VaultSession]:
    """A Job of ``phase``: the dispatcher mints its wrapped token, the agent starts from its env."""
    investigation_id = uuid.uuid4().hex
    minter = VaultCredentials(load_settings(None, vault.env).vault)
    try:
        wrapped = await minter.mint(phase=phase, investigation_id=investigation_id,
                                    incident_key=f"incident-{investigation_id[:8]}",
                                    job_name=f"aj-{investigation_id[:12]}", ttl=600)
    finally:
        await minter.close()
    input_dir = tmp_path / f"input-{phase.value}"
    input_dir.mkdir()
    env = agent_config.load({
        "AGENTJOBS_INVESTIGATION_ID": investigation_id,
        "AGENTJOBS_PHASE": phase.value,
        "AGENTJOBS_INPUT_DIR": str(input_dir),
        "AGENTJOBS_VAULT__ADDR": vault.server.addr,
        "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
        "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1:5672/",
    })
    env.wrapped_token_file.write_text(wrapped.wrapping_token)
    session = await credentials.start(env)
    try:
        assert session.phase is phase
        yield session
    finally:
        await session.revoke_self()  # and with it the leases: Vault drops the users


async def connect(postgres: Postgres, user: str, password: str | None = None,
                  *, autocommit: bool = True) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(
        host=postgres.host, port=postgres.port, dbname=postgres.dbname, user=user, password=password,
        autocommit=autocommit, connect_timeout=5,
    )


@dataclass
class Blocker:
    """A session of an ordinary (non-superuser) role holding an ACCESS EXCLUSIVE table lock."""

    role: str
    table: str
    conn: psycopg.AsyncConnection
    pid: int


@pytest_asyncio.fixture(loop_scope="session")
async def blocker(postgres: Postgres) -> AsyncIterator[Blocker]:
    suffix = uuid.uuid4().hex[:10]
    role, table = f"aj_app_{suffix}", f"aj_locked_{suffix}"
    async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
        await admin.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(table)))
        await admin.execute(sql.SQL("GRANT UPDATE ON {} TO {}").format(sql.Identifier(table), sql.Identifier(role)))
    conn = await connect(postgres, role, autocommit=False)
    try:
        await conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(table)))
        pid = conn.info.backend_pid
        assert await holds_lock(postgres, pid, table)
        yield Blocker(role=role, table=table, conn=conn, pid=pid)
    finally:
        with contextlib.suppress(psycopg.Error):
            await conn.close()
        async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def holds_lock(postgres: Postgres, pid: int, table: str) -> bool:
    async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
        cur = await admin.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND relation = %s::regclass AND granted "
            "AND mode = 'AccessExclusiveLock'", (pid, table))
        return await cur.fetchone() is not None


async def backend_alive(postgres: Postgres, pid: int) -> bool:
    async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
        return await cur.fetchone() is not None


async def member_of_signal_backend(postgres: Postgres, user: str) -> bool:
    async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT pg_has_role(%s, 'pg_signal_backend', 'MEMBER')", (user,))
        row = await cur.fetchone()
        assert row is not None
        return bool(row[0])


async def database_user(session: VaultSession) -> DynamicSecret:
    got = await session.database()
    assert isinstance(got, DynamicSecret), got
    return got


# --------------------------------------------------------------------------- #
# pg_terminate_backend, called directly with each phase's own database user
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY], ids=lambda p: p.value)
async def test_a_phase_that_may_not_act_cannot_terminate_a_backend(
    vault: Vault, postgres: Postgres, blocker: Blocker, phase: Phase, tmp_path: Path
) -> None:
    async with agent_session(vault, phase, tmp_path) as session:
        # Given the phase's database user: the read-only diagnostics role
        user = await database_user(session)
        assert user.lease.lease_id.startswith(f"database/creds/{layout.DATABASE_ROLE}/")
        assert not await member_of_signal_backend(postgres, user.username)
        async with await connect(postgres, user.username, user.password) as conn:
            cur = await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (blocker.pid,))
            assert (await cur.fetchone()) == (1,)  # it sees the blocker (pg_read_all_stats)…

            # When it calls pg_terminate_backend on the blocker directly (no gate in the way)
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=DENIED):
                await conn.execute("SELECT pg_terminate_backend(%s)", (blocker.pid,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=DENIED):
                await conn.execute("SELECT pg_cancel_backend(%s)", (blocker.pid,))

        # Then the blocker's session survives, still holding its lock
        await blocker.conn.execute("SELECT 1")
        assert await backend_alive(postgres, blocker.pid)
        assert await holds_lock(postgres, blocker.pid, blocker.table)


@pytest.mark.parametrize("phase", list(ACTING), ids=lambda p: p.value)
async def test_a_phase_that_may_act_terminates_the_blocker(
    vault: Vault, postgres: Postgres, blocker: Blocker, phase: Phase, tmp_path: Path
) -> None:
    async with agent_session(vault, phase, tmp_path) as session:
        # Given the phase's database user: the remediation role, a member of pg_signal_backend
        user = await database_user(session)
        assert user.lease.lease_id.startswith(f"database/creds/{layout.DATABASE_REMEDIATION_ROLE}/")
        assert await member_of_signal_backend(postgres, user.username)
        async with await connect(postgres, user.username, user.password) as conn:
            # …and nothing more: still read-only, and no power over a superuser's backend
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await conn.execute("CREATE TABLE agent_was_here (id int)")
            async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as superuser:
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match=DENIED):
                    await conn.execute("SELECT pg_terminate_backend(%s)", (superuser.info.backend_pid,))
                await superuser.execute("SELECT 1")

            # When it terminates the blocker
            cur = await conn.execute("SELECT pg_terminate_backend(%s)", (blocker.pid,))
            assert (await cur.fetchone()) == (True,)

        # Then the blocker's session is gone, and its lock with it
        async def gone() -> bool:
            return not await backend_alive(postgres, blocker.pid)

        await wait_until(gone, timeout=GONE_WITHIN, what="the blocker's backend terminated")
        assert not await holds_lock(postgres, blocker.pid, blocker.table)
        with pytest.raises(psycopg.OperationalError):
            await blocker.conn.execute("SELECT 1")


# --------------------------------------------------------------------------- #
# Vault: each phase reads its own role only
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
async def test_a_phase_token_cannot_read_the_other_database_role(
    vault: Vault, phase: Phase, tmp_path: Path
) -> None:
    other = (layout.DATABASE_ROLE if phase in ACTING else layout.DATABASE_REMEDIATION_ROLE)
    async with agent_session(vault, phase, tmp_path) as session:
        got = await session.read_secret(f"{layout.DATABASE_MOUNT}/creds/{other}")
        assert isinstance(got, Denied), got
        assert got.reason.endswith("(403)"), got.reason  # Vault's permission denied


# --------------------------------------------------------------------------- #
# revocation
# --------------------------------------------------------------------------- #


async def test_revoking_the_remediation_lease_drops_its_user(
    vault: Vault, postgres: Postgres, tmp_path: Path
) -> None:
    async with agent_session(vault, Phase.AUTONOMOUS, tmp_path) as session:
        # Given a remediation user (member of pg_signal_backend) with an open session
        user = await database_user(session)
        assert await member_of_signal_backend(postgres, user.username)
        conn = await connect(postgres, user.username, user.password)
        try:
            pid = conn.info.backend_pid

            # When its lease is revoked
            await asyncio.to_thread(vault.root().sys.revoke_lease, user.lease.lease_id)

            # Then the session is terminated and the role dropped — the membership did not block it
            async def dropped() -> bool:
                return not await postgres.role_exists(user.username)

            await wait_until(dropped, timeout=GONE_WITHIN, what="remediation user dropped")
            assert not await backend_alive(postgres, pid)
            async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as admin:
                cur = await admin.execute(
                    "SELECT count(*) FROM pg_auth_members m WHERE NOT EXISTS "
                    "(SELECT FROM pg_roles r WHERE r.oid = m.member)")
                assert (await cur.fetchone()) == (0,)  # no membership left behind
                cur = await admin.execute(
                    "SELECT count(*) FROM pg_db_role_setting s WHERE s.setrole <> 0 AND NOT EXISTS "
                    "(SELECT FROM pg_roles r WHERE r.oid = s.setrole)")
                assert (await cur.fetchone()) == (0,)  # nor its default_transaction_read_only
        finally:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
