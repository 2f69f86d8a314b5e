"""``agentjobs up --demo``: real, harmless problems on this machine's own services, and their alerts.

Inside scratch objects the demo creates and owns — a PostgreSQL database and
login role, a RabbitMQ vhost (or, without the management API, one queue in
agentjobs' vhost) — it makes three incidents an on-call engineer knows:

- **lock contention**: ``billing-batch`` updates an order and leaves its
  transaction open; three ``checkout-api`` sessions wait for that row lock;
- **connection hog**: ``report-exporter`` opens most of ``max_connections`` and
  leaves every session idle in transaction (while keeping enough slots free for
  the agents and Vault);
- **queue backlog**: ``orders.fulfilment`` fills up with no consumer.

It then publishes the alerts as Alertmanager would — one group per problem,
re-sent every "group interval", a second alert joining one group — so the
agents investigate the real state. ``close()`` removes everything it created:
sessions, database, role, queue and vhost. Pure parts (names, sizing, the
webhook bodies) are functions; the I/O sits in ``DemoProblems``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import aiohttp

from schemas.logs import get_logger
from dispatcher.cli.preflight import management_api
from dispatcher.plumbing.settings import Settings

log = get_logger("agentjobs.demo")

HOLDER_APP = "billing-batch"
WAITER_APP = "checkout-api"
HOG_APP = "report-exporter"
WAITERS = 3
QUEUE = "orders.fulfilment"
BACKLOG = 500  # messages left in the queue
RESENDS = 20  # notifications per group (Alertmanager re-sends a firing group every group_interval)
SATURATION = 0.88  # share of max_connections the hog brings the server to
SPARE_SLOTS = 10  # ordinary slots always left free: agents and Vault must still get in


@dataclass(frozen=True, kw_only=True)
class Names:
    """Everything the demo creates, named with one random suffix (no clash with a second run)."""

    suffix: str

    @property
    def database(self) -> str:
        return f"agentjobs_demo_{self.suffix}"

    @property
    def role(self) -> str:
        return f"agentjobs_demo_{self.suffix}"

    @property
    def vhost(self) -> str:
        return f"agentjobs-demo-{self.suffix}"


def hog_size(max_connections: int, reserved: int, in_use: int) -> int:
    """Sessions the hog opens: the server near saturation, ``SPARE_SLOTS`` ordinary slots left (pure)."""
    wanted = math.ceil(SATURATION * max_connections) - in_use
    room = max_connections - reserved - in_use - SPARE_SLOTS
    return max(0, min(wanted, room))


def with_dsn_parts(dsn: str, *, user: str | None = None, password: str | None = None,
                   database: str | None = None) -> str:
    """``dsn`` with another user, password or database (pure)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    name = user if user is not None else (parts.username or "")
    secret = password if password is not None else (parts.password or "")
    auth = quote(name, safe="") + (f":{quote(secret, safe='')}" if secret else "")
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit((parts.scheme, f"{auth}@{host}" if auth else host, path, parts.query, ""))


def _alert(name: str, labels: dict[str, str], summary: str, starts: datetime, expr: str) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": summary},
        "startsAt": starts.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=" + quote(expr, safe=""),
        "fingerprint": secrets.token_hex(8),
    }


def _webhook(name: str, alerts: list[dict[str, Any]]) -> bytes:
    common = {k: v for k, v in alerts[0]["labels"].items()
              if all(a["labels"].get(k) == v for a in alerts)}
    return json.dumps({
        "version": "4", "groupKey": f'{{}}:{{alertname="{name}"}}', "status": "firing",
        "receiver": "agentjobs", "groupLabels": {"alertname": name}, "commonLabels": common,
        "commonAnnotations": {}, "externalURL": "http://alertmanager.monitoring:9093",
        "truncatedAlerts": 0, "alerts": alerts,
    }).encode()


def alert_groups(names: Names, *, postgres: str | None, vhost: str, queue: str = QUEUE,
                 now: datetime) -> list[list[bytes]]:
    """The notifications per group, in the order Alertmanager sends them (pure).

    ``postgres``: the server's ``host:port`` (None: no database problems). The connections
    group gains a second alert (the replica's exporter) after a few re-sends.
    """
    starts = now - timedelta(minutes=1)
    groups: list[list[dict[str, Any]]] = []
    if postgres is not None:
        db = {"domain": "database", "instance": postgres, "datname": names.database, "service": "orders-db"}
        groups.append([_alert(
            "PostgresLockContention", {**db, "severity": "critical"},
            f"{WAITERS} sessions waiting for locks in {names.database}", starts,
            f'sum(pg_locks_count{{datname="{names.database}",mode="exclusivelock"}}) > 0')])
        groups.append([_alert(
            "PostgresTooManyConnections", {**db, "severity": "critical"},
            "connections above 85% of max_connections", starts,
            "sum(pg_stat_activity_count) / max(pg_settings_max_connections) > 0.85")])
    groups.append([_alert(
        "OrdersQueueBacklog",
        {"severity": "warning", "domain": "messaging", "vhost": vhost, "queue": queue,
         "service": "fulfilment-worker"},
        f"{queue} has more than 100 ready messages", starts,
        f'rabbitmq_queue_messages_ready{{queue="{queue}"}} > 100')])
    bodies = []
    for alerts in groups:
        sends = []
        for n in range(RESENDS):
            if n == 5 and alerts[0]["labels"]["alertname"] == "PostgresTooManyConnections":
                joined = dict(alerts[0], fingerprint=secrets.token_hex(8),
                              labels={**alerts[0]["labels"], "replica": "standby"})
                alerts = [*alerts, joined]
            sends.append(_webhook(alerts[0]["labels"]["alertname"], alerts))
        bodies.append(sends)
    return bodies


def interleaved(groups: list[list[bytes]]) -> list[bytes]:
    """Round-robin over the groups, as re-sends of concurrent groups arrive (pure)."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


@dataclass
class DemoProblems:
    """The scratch objects and the live problems in them; ``close()`` removes all of it."""

    settings: Settings
    names: Names = field(default_factory=lambda: Names(suffix=secrets.token_hex(3)))
    vhost: str = ""  # where the backlog queue lives
    own_vhost: bool = False
    postgres: str | None = None  # host:port of the server with problems
    _password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    _sessions: list[Any] = field(default_factory=list)
    _waits: list[asyncio.Task[Any]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # what exists now, for the summary line

    # -- set up ------------------------------------------------------------------------------

    async def open(self, *, management: bool) -> None:
        if self.settings.postgres.admin_dsn:
            await self._database()
        await self._backlog(management=management)

    async def _admin(self, database: str | None = None) -> Any:
        import psycopg

        dsn = with_dsn_parts(self.settings.postgres.admin_dsn, database=database)
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5,
                                                     application_name="agentjobs-demo")

    async def _app(self, application: str, *, autocommit: bool = False) -> Any:
        """A session of the demo's own role — a plain LOGIN role, never a superuser, so an agent of a
        remediation phase (``pg_signal_backend``) may terminate it, as it may an application's."""
        import psycopg

        dsn = with_dsn_parts(self.settings.postgres.admin_dsn, user=self.names.role,
                             password=self._password, database=self.names.database)
        return await psycopg.AsyncConnection.connect(dsn, connect_timeout=5, application_name=application,
                                                     autocommit=autocommit)

    async def _database(self) -> None:
        from psycopg import sql

        n = self.names
        async with await self._admin() as admin:
            # NOSUPERUSER, said explicitly: pg_signal_backend cannot signal a superuser's backend
            await admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}")
                                .format(sql.Identifier(n.role), sql.Literal(self._password)))
            self.created.append(f"PostgreSQL role {n.role}")
            await admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(n.database), sql.Identifier(n.role)))
            self.created.append(f"database {n.database}")
            row = await (await admin.execute(
                "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')")).fetchone()
        parts = urlsplit(self.settings.postgres.admin_dsn)
        self.postgres = f"{parts.hostname}:{parts.port or 5432}"
        setup = await self._app("agentjobs-demo")
        async with setup:
            await setup.execute("CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL)")
            await setup.execute("INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 100) g")
            await setup.commit()
        # Lock contention: the holder's transaction stays open; each waiter blocks on its row. The
        # waiters commit as they get it (autocommit): once the holder ends (an agent terminated it),
        # they all proceed, one after the other.
        holder = await self._app(HOLDER_APP)
        self._sessions.append(holder)
        await holder.execute("UPDATE orders SET status = 'invoicing' WHERE id = 42")
        for _ in range(WAITERS):
            waiter = await self._app(WAITER_APP, autocommit=True)
            self._sessions.append(waiter)
            self._waits.append(asyncio.create_task(
                waiter.execute("UPDATE orders SET status = 'paid' WHERE id = 42")))
        max_connections, reserved, in_use = row
        hog = hog_size(max_connections, reserved, in_use + 1 + WAITERS)
        for _ in range(hog):  # a connection leak: sessions idle in transaction
            session = await self._app(HOG_APP)
            self._sessions.append(session)
            await session.execute("SELECT count(*) FROM orders")
        log.info("demo_database_problems", database=n.database, waiters=WAITERS, hog=hog,
                 max_connections=max_connections)

    async def _backlog(self, *, management: bool) -> None:
        self.vhost = unquote(urlsplit(self.settings.amqp.url).path.removeprefix("/")) or "/"
        if management:
            await self._management("PUT", f"vhosts/{quote(self.names.vhost, safe='')}", {})
            self.own_vhost, self.vhost = True, self.names.vhost
            self.created.append(f"RabbitMQ vhost {self.vhost}")
            user = urlsplit(self.settings.amqp.url).username or "guest"
            await self._management("PUT", f"permissions/{quote(self.vhost, safe='')}/{quote(user, safe='')}",
                                   {"configure": ".*", "write": ".*", "read": ".*"})
        async with await aio_pika.connect(self._amqp_url(), timeout=10) as connection:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(self._queue_name(), durable=True)
            if not self.own_vhost:
                self.created.append(f"queue {queue.name}")
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(json.dumps({"order": i}).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name, timeout=30) for i in range(BACKLOG)))

    def _queue_name(self) -> str:
        # In agentjobs' own vhost the name carries the suffix: never touch someone's queue.
        return QUEUE if self.own_vhost else f"{QUEUE}.demo-{self.names.suffix}"

    def _amqp_url(self) -> str:
        parts = urlsplit(self.settings.amqp.url)
        return urlunsplit((parts.scheme, parts.netloc, "/" + quote(self.vhost, safe=""), parts.query, ""))

    async def _management(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        base, auth = management_api(self.settings)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.request(method, f"{base}/api/{path}", json=body, auth=auth) as answer:
                if answer.status >= 300 and not (method == "DELETE" and answer.status == 404):
                    raise RuntimeError(f"management API {method} /api/{path}: HTTP {answer.status}")

    # -- what the agents are told ------------------------------------------------------------

    def notifications(self, now: datetime | None = None) -> tuple[list[bytes], int]:
        """(webhook bodies in sending order, number of groups)."""
        groups = alert_groups(self.names, postgres=self.postgres, vhost=self.vhost, queue=self._queue_name(),
                              now=now or datetime.now(UTC))
        return interleaved(groups), len(groups)

    # -- tear down ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove everything, whatever state set-up reached; failures are logged, never raised."""
        from psycopg import sql

        if any(c.startswith("PostgreSQL role") for c in self.created):  # the database is the role's
            try:
                async with await self._admin() as admin:
                    await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                                        (self.names.role,))
                    await admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.names.database)))
                    await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.names.role)))
            except Exception as exc:  # noqa: BLE001 - report and go on with the broker part
                log.error("demo_cleanup_failed", what="postgresql", error=str(exc)[:200])
        for task in self._waits:
            task.cancel()
        for task in self._waits:
            with contextlib.suppress(BaseException):
                await task
        for session in self._sessions:
            with contextlib.suppress(Exception):
                await session.close()
        try:
            if self.own_vhost:
                await self._management("DELETE", f"vhosts/{quote(self.vhost, safe='')}")
            elif self.vhost:
                async with await aio_pika.connect(self._amqp_url(), timeout=10) as connection:
                    channel = await connection.channel()
                    await channel.queue_delete(self._queue_name(), if_unused=False, if_empty=False)
        except Exception as exc:  # noqa: BLE001
            log.error("demo_cleanup_failed", what="rabbitmq", error=str(exc)[:200])
        self.created.clear()
