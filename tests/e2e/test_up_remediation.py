"""`agentjobs up`, the embedded default, remediating: a scope pinned to autonomous gets its lock contention resolved.

Everything is real: `agentjobs up` (its own OpenBao, the LocalRuntime, trust, the board) on a
private PostgreSQL cluster (so the agent sees no other test's lock chains, and no other test
sees this agent act), an application role that is not a superuser holding a row lock idle in
transaction while checkouts wait for that row, and the lock-contention alert published with
`agentjobs publish incident`. The operator's commands are the product's: `agentjobs phase pin`
with the admin credentials of up's state dir, `agentjobs actions disable|enable` with up's
OpenBao root token, `agentjobs tail all --json --follow` for what reaches ``agentjobs.results``.

- autonomous (``terminate_backend`` is MEDIUM): executed through the phase's Vault-issued
  ``agentjobs-remediation`` role, verified; the blocker's session is gone, the waiters proceed,
  ``action.executed_verified.database`` is on the results exchange and on the board;
- limited remediation: ``propose_only``, the blocker and its waiters untouched;
- autonomous with the kill switch off: ``refused_kill_switch``, the blocker untouched;
- ``up --demo`` with the scope pinned to autonomous: the demo's own lock holder (its own
  non-superuser role) is terminated by the agent and the board says so.

Up's embedded default allows its agents to act on the database it gives them
(``up.embedded_actions``); nothing here configures an allow-list. Each scenario's blocker is
another application, so the per-target limit (one execution per application and database an
hour) stays out of the scenarios that are not about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import psycopg
import pytest
from psycopg import sql

from dispatcher.plumbing.settings import AmqpSettings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas import ActionRecord
from tests.support.action_records import ActionRecords
from tests.support.identities import seed_up_credentials
from tests.support.lines import Lines
from tests.support.observability import wait_for_activity
from tests.support.pipelines import agents_under, no_process, no_vault_users, stop
from tests.support.services import free_port, temporary_vhost
from tests.support.two_am import POSTGRES_BIN, POSTGRES_MISSING, PostgresCluster, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(POSTGRES_BIN is None, reason=POSTGRES_MISSING),
              pytest.mark.timeout(600)]

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
ALERT = "PostgresLockContention"
# Who holds the row lock, idle in transaction: one application per scenario (the per-target limit,
# one execution per application and database an hour, is not what these scenarios are about)
HOLDERS = {"autonomous": "orders-batch", "limited": "invoice-batch", "kill-switch": "export-batch"}
WAITER_APP = "checkout-api"  # waits for that row
WAITERS = 4
UNDO = "none (a terminated session cannot be restored; its transaction was rolled back)"


# --- the database problem ----------------------------------------------------------------------

@dataclass
class Chain:
    holder: Any  # the application's connection holding the row lock (transaction open)
    holder_pid: int
    waiter_pids: list[int] = field(default_factory=list)
    waiters: list[asyncio.Task[Any]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def lock_pileup(pg: PostgresCluster, role: str, holder_app: str, waiters: int = WAITERS) -> AsyncIterator[Chain]:
    """``role`` (no superuser), as application ``holder_app``, updates a row and leaves its transaction
    open; ``waiters`` autocommit checkouts of the same role update that row too and wait. Every session
    is ended on the way out."""
    table = f"stock_{secrets.token_hex(3)}"
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, n int NOT NULL)").format(
            sql.Identifier(table)))
        await admin.execute(sql.SQL("INSERT INTO {} VALUES (1, 100)").format(sql.Identifier(table)))
        await admin.execute(sql.SQL("GRANT SELECT, UPDATE ON {} TO {}").format(sql.Identifier(table),
                                                                              sql.Identifier(role)))
    update = sql.SQL("UPDATE {} SET n = n - 1 WHERE id = 1").format(sql.Identifier(table))
    holder = await psycopg.AsyncConnection.connect(pg.dsn(role), application_name=holder_app)
    chain = Chain(holder=holder, holder_pid=holder.info.backend_pid)
    conns: list[Any] = []
    try:
        await holder.execute(update)  # row lock held, transaction open: idle in transaction
        for _ in range(waiters):
            conn = await psycopg.AsyncConnection.connect(pg.dsn(role), application_name=WAITER_APP, autocommit=True)
            conns.append(conn)
            chain.waiter_pids.append(conn.info.backend_pid)
            chain.waiters.append(asyncio.create_task(conn.execute(update)))
        await wait_for_activity(pg.dsn(), "pid = ANY(%s) AND wait_event_type = 'Lock'", [chain.waiter_pids],
                                waiters)
        yield chain
    finally:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)",
                                ([chain.holder_pid, *chain.waiter_pids],))
        for task in chain.waiters:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=5)
        for conn in (holder, *conns):
            with contextlib.suppress(Exception):
                await conn.close()
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


async def alive(pg: PostgresCluster, pids: list[int]) -> set[int]:
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
        return {row[0] for row in await cur.fetchall()}


async def waiting(pg: PostgresCluster, pids: list[int]) -> set[int]:
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) "
                                  "AND wait_event_type = 'Lock'", (pids,))
        return {row[0] for row in await cur.fetchall()}


async def sessions_of(pg: PostgresCluster, applications: tuple[str, ...]) -> list[tuple[int, str]]:
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        cur = await admin.execute("SELECT pid, application_name FROM pg_stat_activity "
                                  "WHERE application_name = ANY(%s)", (list(applications),))
        return [(row[0], row[1]) for row in await cur.fetchall()]


@contextlib.asynccontextmanager
async def application_role(pg: PostgresCluster) -> AsyncIterator[str]:
    """A LOGIN role without any special right (above all not a superuser), dropped after."""
    role = f"orders_app_{secrets.token_hex(3)}"
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
    try:
        yield role
    finally:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def lock_alert(step: str, pg: PostgresCluster) -> bytes:
    """An Alertmanager v4 webhook for the contention, one group per ``step`` (so one investigation each)."""
    starts = datetime.now(UTC) - timedelta(seconds=30)
    expr = 'sum by (datname) (pg_locks_count{datname="postgres",mode="exclusivelock"}) > 0'
    labels = {"alertname": ALERT, "severity": "critical", "domain": "database", "service": "orders-db",
              "instance": f"127.0.0.1:{pg.port}", "datname": "postgres", "step": step}
    return json.dumps({
        "version": "4", "groupKey": f'{{}}:{{alertname="{ALERT}", step="{step}"}}', "status": "firing",
        "receiver": "agentjobs", "groupLabels": {"alertname": ALERT, "step": step}, "commonLabels": labels,
        "commonAnnotations": {}, "externalURL": "http://alertmanager.monitoring:9093", "truncatedAlerts": 0,
        "alerts": [{
            "status": "firing", "labels": labels,
            "annotations": {"summary": f"{WAITERS} sessions waiting for row locks on orders-db"},
            "startsAt": starts.strftime("%Y-%m-%dT%H:%M:%SZ"), "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=" + quote(expr, safe=""),
            "fingerprint": secrets.token_hex(8)}],
    }).encode()


# --- agentjobs up and the operator's commands ----------------------------------------------------

def up_env(tmp_path: Path, amqp_vhost: Any, pg: PostgresCluster) -> dict[str, str]:
    """Up's own state dir, OpenBao address and ports, on the test's vhost and the private cluster."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTJOBS_", "VAULT_", "BAO_"))}
    seed_up_credentials(tmp_path / "state", amqp_vhost.amqp_url)
    return {**clean, "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"),
            "AGENTJOBS_AMQP__URL": amqp_vhost.amqp_url, "AGENTJOBS_VAULT__RABBITMQ_VHOST": amqp_vhost.name,
            "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}",
            "AGENTJOBS_METRICS__PORT": str(free_port()), "AGENTJOBS_BRIDGE__PORT": str(free_port()),
            "AGENTJOBS_POSTGRES__ADMIN_DSN": pg.dsn(), "AGENTJOBS_POSTGRES__DSN": pg.address}


async def cli(env: dict[str, str], *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    done = await asyncio.to_thread(subprocess.run, [AGENTJOBS, *args], env=env, input=stdin, capture_output=True,
                                   timeout=90)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


class Up:
    """``agentjobs up`` (plain or ``--demo --exit``) and ``agentjobs tail all --json --follow`` beside it."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env, self.tmp_path = env, tmp_path
        self.up: asyncio.subprocess.Process | None = None
        self.tail: asyncio.subprocess.Process | None = None
        self.out: Lines | None = None
        self.results: Lines | None = None
        self.actions = ActionRecords()  # every ActionRecord on agentjobs.results, from before up starts

    async def start(self, stack: contextlib.AsyncExitStack, *args: str) -> Up:
        # the topology as up declares it, the tail bound to it, then up: nothing published is missed
        url = self.env["AGENTJOBS_AMQP__URL"]  # the vhost's administrator (guest)
        connection = await aio_pika.connect(url)
        stack.push_async_callback(connection.close)
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings(url=url)))
        await self.actions.bind(connection)
        self.tail = await asyncio.create_subprocess_exec(AGENTJOBS, "tail", "all", "--json", "--follow", env=self.env,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.PIPE)
        stack.push_async_callback(stop, self.tail, signal.SIGINT, 30)
        self.results, said = Lines(self.tail.stdout), Lines(self.tail.stderr)  # type: ignore[arg-type]
        await said.wait_for(lambda line: line.startswith("tail: all"), 30, "tail's ready line")
        self.up = await asyncio.create_subprocess_exec(AGENTJOBS, "up", *args, env=self.env,
                                                       stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        stack.push_async_callback(stop, self.up, signal.SIGTERM, 60)  # normally stopped by `finish`
        self.out = Lines(self.up.stdout)  # type: ignore[arg-type]
        await self.out.wait_for(lambda line: line.startswith("running"), 120, "`running` from up")
        return self

    def report(self) -> str:
        assert self.out is not None and self.results is not None
        return "\n".join(self.out.lines[-60:]) + "\n\n" + "\n".join(r[:1500] for r in self.results.lines[-12:])

    async def pin(self, phase: str) -> None:
        pinned = await cli(self.env, "phase", "pin", "database", phase, "--reason", "demo", "--operator", "e2e")
        assert pinned.returncode == 0 and f"→ {phase}" in pinned.stdout, (pinned.stdout, pinned.stderr)
        assert self.out is not None  # and the board saw this very change (the dispatcher follows the same log)
        change = pinned.stdout.strip()  # database: <from> → <to> (pinned: demo)
        await self.out.wait_for(lambda line: line.startswith("  phase       ") and line.endswith(change),
                                30, f"the board showing {change}")

    async def publish(self, body: bytes) -> str:
        published = await cli(self.env, "publish", "incident", "-", stdin=body)
        assert published.returncode == 0, published.stderr
        return json.loads(published.stdout)["investigation_id"]

    async def result(self, investigation_id: str, what: str, timeout: float, **want: Any) -> dict:
        """The first message about the investigation whose fields start with ``want``'s values."""
        assert self.results is not None

        def about(line: str) -> bool:
            if investigation_id not in line:
                return False
            record = json.loads(line)
            record = {**record.get("headers", {}), **record}  # a record tail could not decode: its headers
            return record.get("investigation_id") == investigation_id and all(
                str(record.get(k, "")).startswith(v) for k, v in want.items())

        try:
            return json.loads(await self.results.wait_for(about, timeout, what))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\n{self.report()}") from None

    async def investigated(self, investigation_id: str) -> tuple[dict, tuple[str, ActionRecord]]:
        """(the agent's finding, the routing key and record of its terminate_backend); the Job succeeded."""
        finding = await self.result(investigation_id, "the finding", 150, kind="finding")
        # `tail` sees the record (decoded, or by its headers when its reader does not know the kind) ...
        await self.result(investigation_id, "the action record in `tail`", 30,
                          routing_key="action.", action="terminate_backend")
        ended = await self.result(investigation_id, "the Job's ending", 60, kind="lifecycle",
                                  routing_key="lifecycle.", state=("succeeded", "failed", "cancelled"))
        assert ended["state"] == "succeeded", self.report()
        try:  # ... and our own Results consumer decodes it as what it is
            return finding, (await self.actions.of(investigation_id, timeout=30))[0]
        except TimeoutError:
            raise AssertionError(f"no ActionRecord on agentjobs.results\n\n{self.report()}") from None

    async def finish(self) -> str:
        """SIGTERM up: exit 0, `stopped`, no agent, no OpenBao left."""
        assert self.up is not None and self.out is not None
        code = await stop(self.up, signal.SIGTERM, 60)
        text = await self.out.finished()
        assert code == 0 and "stopped" in text.splitlines()[-1] and "Traceback" not in text, text[-3000:]
        return text

    async def exited(self, timeout: float) -> str:
        """``up --demo --exit``: it ends by itself with exit 0."""
        assert self.up is not None and self.out is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.up.wait()
        except TimeoutError:
            raise AssertionError(f"up --demo --exit still running after {timeout} s\n{self.report()}") from None
        text = await self.out.finished()
        assert code == 0 and "Traceback" not in text, text[-4000:]
        return text

    def nothing_left(self) -> None:
        vault_listen = self.env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
        for pattern in (f"dev-listen-address={vault_listen}", f"{self.tmp_path}/state"):
            assert no_process(pattern), pattern
        assert not agents_under(self.tmp_path), agents_under(self.tmp_path)


def terminate_action(finding: dict) -> dict:
    [action] = [a for a in finding["proposed_actions"] if a["action"] == "terminate_backend"]
    return action


# --- the scenarios -----------------------------------------------------------------------------

async def test_pinned_autonomous_the_agent_terminates_the_root_blocker_limited_proposes_kill_switch_refuses(
    amqp_vhost, rabbitmq_management, tmp_path,
):
    async with contextlib.AsyncExitStack() as stack:
        pg = await stack.enter_async_context(running_cluster())
        role = await stack.enter_async_context(application_role(pg))
        roles_before = await pg.roles()
        env = up_env(tmp_path, amqp_vhost, pg)
        up = await Up(env, tmp_path).start(stack)

        # Given scope database pinned to autonomous and an application's forgotten transaction with waiters
        await up.pin("autonomous")
        async with lock_pileup(pg, role, HOLDERS["autonomous"]) as chain:
            # When the contention's alert arrives
            investigation = await up.publish(lock_alert("autonomous", pg))
            finding, (key, record) = await up.investigated(investigation)
            report = up.report()
            # Then the agent named the root blocker and terminated it, verified
            assert finding["reasoner"] == "rules" and finding["phase"] == "autonomous", report
            assert finding["hypotheses"][0]["cause"] == "lock_contention", report
            action = terminate_action(finding)
            assert action["params"]["pid"] == str(chain.holder_pid), report
            assert action["executed"] is True and action["params"]["outcome"] == "executed_verified", report
            assert key == "action.executed_verified.database", report
            assert (record.action, record.decision, record.outcome, record.executed, record.phase.value) == (
                "terminate_backend", "execute", "executed_verified", True, "autonomous"), report
            assert record.target.startswith(f"pid {chain.holder_pid}") and record.undo == UNDO, report
            assert f"blocked {WAITERS} session(s)" in record.before, report
            assert f"application {HOLDERS['autonomous']}" in record.before, report
            assert record.params["limit_target"] == "application_name 'orders-batch' on database postgres", report
            assert record.after.startswith(f"pid {chain.holder_pid} is gone; 0 session(s) wait on it"), report
            # and the blocker's session is gone, the waiters proceed (each commits its update in turn)
            assert await alive(pg, [chain.holder_pid]) == set(), report
            done, pending = await asyncio.wait(chain.waiters, timeout=15)
            assert not pending and all(t.exception() is None for t in done), report
            with pytest.raises(psycopg.OperationalError):  # the application sees its session terminated
                await chain.holder.execute("SELECT 1")
            # and the board says what the agent did
            assert up.out is not None
            await up.out.wait_for(lambda line: "action" in line and "terminate_backend" in line
                                  and "executed_verified" in line and f"pid {chain.holder_pid}" in line,
                                  10, "the board's line for the executed action")

        # Given the scope pinned to limited remediation (MEDIUM actions are proposed only)
        await up.pin("limited-remediation")
        async with lock_pileup(pg, role, HOLDERS["limited"]) as chain:
            investigation = await up.publish(lock_alert("limited", pg))
            finding, (key, record) = await up.investigated(investigation)
            report = up.report()
            # Then terminate_backend is proposed, not executed, and the chain is left alone
            assert finding["phase"] == "limited-remediation", report
            action = terminate_action(finding)
            assert action["params"]["pid"] == str(chain.holder_pid) and action["executed"] is False, report
            assert key == "action.propose_only.database", report
            assert (record.decision, record.outcome, record.executed, record.undo) == (
                "propose_only", "propose_only", False, ""), report
            assert await alive(pg, [chain.holder_pid, *chain.waiter_pids]) == {chain.holder_pid,
                                                                                 *chain.waiter_pids}, report
            assert await waiting(pg, chain.waiter_pids) == set(chain.waiter_pids), report

        # Given autonomous again, but an operator turned the kill switch off
        off = await cli(env, "actions", "disable", "--reason", "test", "--operator", "e2e")
        assert off.returncode == 0 and off.stdout.startswith("actions DISABLED by e2e"), (off.stdout, off.stderr)
        try:
            await up.pin("autonomous")
            async with lock_pileup(pg, role, HOLDERS["kill-switch"]) as chain:
                investigation = await up.publish(lock_alert("kill-switch", pg))
                finding, (key, record) = await up.investigated(investigation)
                report = up.report()
                # Then the agent refuses to act, says why, and the blocker survives
                assert finding["phase"] == "autonomous", report
                action = terminate_action(finding)
                assert action["params"]["pid"] == str(chain.holder_pid) and action["executed"] is False, report
                assert key == "action.refused_kill_switch.database", report
                assert (record.decision, record.outcome, record.executed) == (
                    "execute", "refused_kill_switch", False), report
                assert "DISABLED by e2e" in record.reason and "test" in record.reason, report
                assert await alive(pg, [chain.holder_pid]) == {chain.holder_pid}, report
                assert await waiting(pg, chain.waiter_pids) == set(chain.waiter_pids), report
        finally:
            on = await cli(env, "actions", "enable", "--reason", "test over", "--operator", "e2e")
            assert on.returncode == 0, on.stderr

        # When up stops: three Jobs, nothing left — no process, no Vault-issued database or broker user
        text = await up.finish()
        assert len([line for line in text.splitlines() if line.strip().startswith("dispatched")]) == 3, text
        up.nothing_left()
        assert await pg.roles() == roles_before
        assert await no_vault_users(rabbitmq_management, amqp_vhost.name)


async def test_up_demo_with_the_database_scope_pinned_autonomous_the_agent_ends_the_demos_lock(
    rabbitmq_management, tmp_path,
):
    # a vhost of its own: the phase and action logs of the test above do not count here
    async with temporary_vhost(rabbitmq_management, hint="up-remediation-demo") as vhost, \
            contextlib.AsyncExitStack() as stack:
        pg = await stack.enter_async_context(running_cluster())
        roles_before = await pg.roles()
        env = up_env(tmp_path, vhost, pg)
        # Given an operator pinned scope database to autonomous (kept in the phase log across runs of up)
        first = await Up(env, tmp_path).start(stack)
        await first.pin("autonomous")
        await first.finish()

        # When `agentjobs up --demo --exit` creates its problems and publishes their alerts
        demo = await Up(env, tmp_path).start(stack, "--demo", "--exit")
        text = await demo.exited(300)
        report = demo.report()
        # Then the lock contention's Job ran in autonomous and terminated the demo's lock holder, verified:
        # its session belonged to the demo's own role (no superuser), and its 3 waiters got the row
        records = [(k, r) for k, r in demo.actions.now() if r.action == "terminate_backend"]
        assert len(records) == 1, report
        [(key, record)] = records
        assert key == "action.executed_verified.database" and record.phase.value == "autonomous", report
        assert record.params["application_name"] == "billing-batch", report
        assert record.params["usename"].startswith("agentjobs_demo_"), report
        assert "blocked 3 session(s)" in record.before and "application billing-batch" in record.before, report
        assert record.after.startswith(f"pid {record.params['pid']} is gone; 0 session(s) wait on it"), report
        # and the board said so, in up's own output
        assert any(line.startswith("  action      action.executed_verified.database: terminate_backend pid "
                                   f"{record.params['pid']}") for line in text.splitlines()), text[-4000:]
        assert "demo: removed its database, role, sessions, queue and vhost" in text
        # and nothing is left: no demo role or database, no Vault-issued user, no process
        assert await pg.roles() == roles_before
        demo.nothing_left()
