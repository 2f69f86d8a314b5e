"""What ``agentjobs up`` checks before it starts anything: the broker, its management API, PostgreSQL.

A fresh machine has RabbitMQ running without the management plugin, and a
PostgreSQL that answers locally. ``up`` must run its main job there:

- **Broker down** → one line naming the fix, exit 2 (``NO_RABBITMQ``).
- **Management API missing** (Vault's rabbitmq engine issues every agent its own
  broker user through it): on the local node, with the rights to do so, enable
  the plugin and say so in one line; otherwise run in a *reduced mode* — agents
  publish with one shared broker user kept in Vault KV instead of a user of
  their own — and say what they lack and the command that restores it.
  A management API that answers but serves *another* broker (its AMQP listener
  is not our port: a second node on this machine) counts as missing.
- **PostgreSQL**: configured and down → one line, exit 2; not configured and a
  local server answering with trust auth → agents get PostgreSQL credentials by
  default (Vault's database engine as ``postgres``).

Decisions are pure functions; the probes and the plugin command are the I/O.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import aio_pika
import msgspec

from schemas.redaction import mask_text
from dispatcher.plumbing.settings import Settings

NO_RABBITMQ = (
    "error: cannot reach RabbitMQ at {url} ({error}); start it (sudo rabbitmq-server -detached; "
    "not installed: sudo apt-get install rabbitmq-server) or point agentjobs at yours "
    "(AGENTJOBS_AMQP__URL=amqp://user:password@host:5672/vhost)"
)
NO_POSTGRES = (
    "error: cannot reach PostgreSQL at {dsn} ({error}); start it "
    "(sudo pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start) "
    "or unset AGENTJOBS_POSTGRES__ADMIN_DSN to run without database credentials"
)
ENABLE_MANAGEMENT = "sudo rabbitmq-plugins enable rabbitmq_management"
REDUCED_MODE = (
    "RabbitMQ: reduced mode, no management API ({why}): agents lack a broker user of their own "
    "and publish as the shared user {user!r} (from Vault KV). Restore: " + ENABLE_MANAGEMENT
)
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True, kw_only=True)
class BrokerMode:
    """How agents get their broker credentials in this run."""

    per_investigation_users: bool  # False: the reduced mode (shared user from Vault KV)
    note: str = ""  # the one line to print (empty: nothing worth saying)


# --------------------------------------------------------------------------- #
# pure decisions
# --------------------------------------------------------------------------- #


def amqp_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (5671 if parts.scheme == "amqps" else 5672)


def serves_our_broker(overview: dict, port: int) -> bool:
    """True if a management API's ``/api/overview`` lists an AMQP listener on ``port``."""
    return any(
        isinstance(l, dict) and str(l.get("protocol", "")).startswith("amqp") and l.get("port") == port
        for l in overview.get("listeners") or ()
    )


def may_enable_locally(amqp_url: str, local_listeners: str) -> bool:
    """Enable the plugin only on a loopback broker whose local node listens on our port (pure).

    ``local_listeners`` is what ``rabbitmq-diagnostics -q listeners`` printed for the default
    node; a second node on this machine (other ports) is not ours to change.
    """
    parts = urlsplit(amqp_url)
    port = amqp_port(amqp_url)
    return (parts.hostname or "") in LOOPBACK and f"port: {port}, protocol: amqp" in local_listeners


def with_local_postgres(settings: Settings) -> Settings:
    """Settings whose agents get credentials on this machine's PostgreSQL (pure)."""
    admin = urlsplit(LOCAL_POSTGRES)
    target = urlunsplit((admin.scheme, admin.netloc.rpartition("@")[2], admin.path, "", ""))
    return msgspec.structs.replace(
        settings, postgres=msgspec.structs.replace(settings.postgres, admin_dsn=LOCAL_POSTGRES, dsn=target)
    )


# --------------------------------------------------------------------------- #
# probes (I/O)
# --------------------------------------------------------------------------- #


async def rabbitmq_problem(url: str) -> str | None:
    """None if the broker accepts a connection, else a short reason (aiormq's own error line muted)."""
    transport = logging.getLogger("aiormq.connection")
    level, transport.level = transport.level, logging.CRITICAL
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:  # any failure means "not usable"; the message names it
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        transport.setLevel(level)
    await connection.close()
    return None


def management_api(settings: Settings) -> tuple[str, aiohttp.BasicAuth]:
    """The management API's base URL (no credentials) and its basic auth (``amqp.url``'s user by default)."""
    parts = urlsplit(settings.amqp.management_url)
    creds = parts if parts.username else urlsplit(settings.amqp.url)
    base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    return base, aiohttp.BasicAuth(unquote(creds.username or ""), unquote(creds.password or ""))


async def management_problem(settings: Settings) -> str | None:
    """None if the management API answers for *our* broker, else why not (no secrets)."""
    base, auth = management_api(settings)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(f"{base}/api/overview", auth=auth) as answer:
                if answer.status != 200:
                    return f"{base} answered HTTP {answer.status}"
                overview = await answer.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"{base} does not answer: {type(exc).__name__}"
    port = amqp_port(settings.amqp.url)
    if not serves_our_broker(overview, port):
        return f"{base} serves another broker (not the one on port {port})"
    return None


async def _run(*argv: str, timeout: float) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        return 127, str(exc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, f"{argv[0]} timed out after {timeout:.0f} s"
    return proc.returncode or 0, out.decode(errors="replace")


async def enable_local_management(settings: Settings) -> str | None:
    """Try to switch the plugin on for the local node; None on success, else why not."""
    diagnostics, plugins = shutil.which("rabbitmq-diagnostics"), shutil.which("rabbitmq-plugins")
    if not (diagnostics and plugins):
        return "rabbitmq-plugins is not installed here"
    code, listeners = await _run(diagnostics, "-q", "listeners", timeout=30)
    if code != 0:
        return "no rights to manage the local RabbitMQ node"
    if not may_enable_locally(settings.amqp.url, listeners):
        return "the broker is not this machine's default node"
    code, out = await _run(plugins, "enable", "rabbitmq_management", timeout=60)
    if code != 0:
        return f"rabbitmq-plugins failed ({code})"
    for _ in range(30):  # the API needs a moment after the plugin starts
        if await management_problem(settings) is None:
            return None
        await asyncio.sleep(1)
    return "the management API did not come up within 30 s of enabling it"


async def broker_mode(settings: Settings) -> BrokerMode:
    """Per-investigation broker users if the management API serves our broker (enabling it where we may)."""
    why = await management_problem(settings)
    if why is None:
        return BrokerMode(per_investigation_users=True)
    refused = await enable_local_management(settings)
    if refused is None:
        return BrokerMode(per_investigation_users=True, note=(
            "RabbitMQ: enabled the management plugin on the local node (Vault's rabbitmq engine issues "
            "each agent its own broker user through its API)"))
    user = urlsplit(settings.amqp.url).username or "guest"
    return BrokerMode(per_investigation_users=False,
                      note=REDUCED_MODE.format(why=f"{why}; not enabled: {refused}", user=user))


async def postgres_problem(dsn: str) -> str | None:
    """None if PostgreSQL accepts ``dsn``, else a short reason."""
    import psycopg

    try:
        connection = await psycopg.AsyncConnection.connect(dsn, connect_timeout=5)
    except (psycopg.Error, OSError) as exc:
        return mask_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:200]
    await connection.close()
    return None


async def postgres_settings(settings: Settings) -> tuple[Settings, str | None, str]:
    """(settings, error line or None, note): configured → must answer; unset → the local server if it answers."""
    if settings.postgres.admin_dsn:
        problem = await postgres_problem(settings.postgres.admin_dsn)
        if problem is not None:
            return settings, NO_POSTGRES.format(dsn=mask_text(settings.postgres.admin_dsn), error=problem), ""
        return settings, None, ""
    if await postgres_problem(LOCAL_POSTGRES) is None:
        local = with_local_postgres(settings)
        return local, None, (f"PostgreSQL: agents get read-only diagnostics users on {local.postgres.dsn} "
                             "(this machine's server; set AGENTJOBS_POSTGRES__ADMIN_DSN for another)")
    return settings, None, ("PostgreSQL: none answers on 127.0.0.1:5432 — agents get no database "
                            "credentials (set AGENTJOBS_POSTGRES__ADMIN_DSN and AGENTJOBS_POSTGRES__DSN)")
