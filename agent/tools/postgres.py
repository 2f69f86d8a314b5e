"""The ``postgres`` tool: PostgreSQL diagnostics through the agent's dynamic read-only user.

What a DBA looks at first during a connection or locking incident, from
``pg_stat_activity``, ``pg_locks`` and ``pg_blocking_pids``: connections by
state / application / client address against ``max_connections``, sessions
idle in transaction, long-running queries and blocking lock chains. Every
query works for a role that has only ``LOGIN`` and ``pg_read_all_stats`` (the
dynamic user Vault issues, see ``dispatcher/credentials/bootstrap.py``).

Bounds: the session is read-only (``default_transaction_read_only``) with a
``statement_timeout``; connecting and querying together are bounded by
``Limits.timeout``; rows by ``LIMIT max_rows`` and query texts by
``query_chars``. One connection is opened lazily and kept for the
investigation (an exhausted server should not have to find a new slot for every
call) and dropped after any failure. The password never appears in an
observation, and password literals in other sessions' query texts are masked.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .toolbox import ParamError, describe_error, failure, parse_duration, redact, unknown_operation

QUERY_CHARS = 200  # characters of each session's query text kept

# Our own sessions (this one, and any agent's, by application_name) are not the incident: they are
# left out of every count, and how many were left out is reported (excluded_own).
OWN_APPLICATION_PREFIX = "agentjobs-agent"  # == the application_name of every agent session

CONNECTIONS_SQL = """\
WITH every AS (
  SELECT *, (pid = pg_backend_pid() OR starts_with(coalesce(application_name, ''), %(own)s)) AS own
  FROM pg_stat_activity WHERE backend_type = 'client backend'),
a AS (
  SELECT coalesce(state, 'unknown') AS state,
         coalesce(nullif(application_name, ''), '(none)') AS app,
         coalesce(host(client_addr), 'local') AS client,
         coalesce(datname, '') AS db,
         extract(epoch FROM now() - xact_start)::float AS xact_age,
         coalesce(state IN ('idle in transaction', 'idle in transaction (aborted)'), false) AS idle_tx
  FROM every WHERE NOT own)
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       (SELECT count(*) FROM a)::int,
       (SELECT coalesce(json_object_agg(state, n), '{}') FROM (SELECT state, count(*) AS n FROM a GROUP BY state) s),
       (SELECT coalesce(json_agg(x ORDER BY x.total DESC, x.application_name), '[]') FROM (
          SELECT app AS application_name, count(*) AS total,
                 count(*) FILTER (WHERE state = 'active') AS active,
                 count(*) FILTER (WHERE state = 'idle') AS idle,
                 count(*) FILTER (WHERE idle_tx) AS idle_in_transaction,
                 round(coalesce(max(xact_age) FILTER (WHERE idle_tx), 0)::numeric, 3)::float
                   AS oldest_idle_in_transaction_s
          FROM a GROUP BY app ORDER BY count(*) DESC, app LIMIT %(rows)s) x),
       (SELECT count(DISTINCT app) FROM a)::int,
       (SELECT coalesce(json_agg(x ORDER BY x.total DESC, x.client_addr), '[]') FROM (
          SELECT client AS client_addr, count(*) AS total,
                 count(*) FILTER (WHERE idle_tx) AS idle_in_transaction
          FROM a GROUP BY client ORDER BY count(*) DESC, client LIMIT %(rows)s) x),
       (SELECT count(DISTINCT client) FROM a)::int,
       (SELECT coalesce(json_agg(x ORDER BY x.total DESC, x.datname), '[]') FROM (
          SELECT db AS datname, count(*) AS total
          FROM a GROUP BY db ORDER BY count(*) DESC, db LIMIT %(rows)s) x),
       (SELECT count(DISTINCT db) FROM a)::int,
       (SELECT round(coalesce(max(xact_age) FILTER (WHERE idle_tx), 0)::numeric, 3)::float FROM a),
       current_user::text,
       (SELECT count(*) FROM every WHERE own)::int"""

_SESSION_COLUMNS = """\
a.pid, a.usename::text, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'),
coalesce(a.datname::text, ''), coalesce(a.state, ''),
round(coalesce(extract(epoch FROM now() - a.xact_start), 0)::numeric, 3)::float,
round(coalesce(extract(epoch FROM now() - a.state_change), 0)::numeric, 3)::float,
round(coalesce(extract(epoch FROM now() - a.query_start), 0)::numeric, 3)::float,
a.wait_event_type, a.wait_event, a.backend_xid IS NOT NULL, left(a.query, %(chars)s)"""
_SESSION_KEYS = ("pid", "usename", "application_name", "client_addr", "datname", "state", "xact_age_s",
                 "idle_s", "running_s", "wait_event_type", "wait_event", "wrote", "query")

IDLE_IN_TRANSACTION_SQL = f"""\
SELECT count(*) OVER ()::int, {_SESSION_COLUMNS}
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend'
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND now() - a.state_change >= make_interval(secs => %(min_s)s)
ORDER BY a.xact_start, a.pid
LIMIT %(rows)s"""

IDLE_BY_APPLICATION_SQL = """\
SELECT coalesce(nullif(application_name, ''), '(none)'), count(*)::int
FROM pg_stat_activity
WHERE backend_type = 'client backend'
  AND state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND now() - state_change >= make_interval(secs => %(min_s)s)
GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %(rows)s"""

LONG_RUNNING_SQL = f"""\
SELECT count(*) OVER ()::int, {_SESSION_COLUMNS}
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.state = 'active' AND a.pid <> pg_backend_pid()
  AND now() - a.query_start >= make_interval(secs => %(min_s)s)
ORDER BY a.query_start, a.pid
LIMIT %(rows)s"""

# pg_blocking_pids is costly (it takes the lock manager's partition locks), so it is
# only asked about sessions that are waiting for a lock at all.
BLOCKED_SQL = f"""\
SELECT count(*) OVER ()::int, w.blocked_by, w.lock_wait_s, {_SESSION_COLUMNS}
FROM pg_stat_activity a
CROSS JOIN LATERAL (
  SELECT pg_blocking_pids(a.pid) AS blocked_by,
         round(coalesce((SELECT extract(epoch FROM now() - min(l.waitstart)) FROM pg_locks l
                         WHERE l.pid = a.pid AND NOT l.granted), 0)::numeric, 3)::float AS lock_wait_s) w
WHERE a.wait_event_type = 'Lock' AND cardinality(w.blocked_by) > 0
ORDER BY w.lock_wait_s DESC, a.pid
LIMIT %(rows)s"""

BLOCKERS_SQL = f"""\
SELECT a.backend_type, {_SESSION_COLUMNS}
FROM pg_stat_activity a WHERE a.pid = ANY(%(pids)s::int[]) ORDER BY a.xact_start NULLS LAST, a.pid"""

# Both sides of streaming replication in one statement: on a primary its standbys (how far behind each
# writes and replays, in bytes — the primary's replay_lag interval only moves when the standby replays,
# so a standby that stopped replaying keeps its last small value) and its slots (WAL each retains); on a
# standby, WAL received but not replayed, the age of the last replayed transaction, whether replay is
# paused and whether the WAL receiver streams. pg_read_all_stats sees every column.
REPLICATION_SQL = """\
SELECT pg_is_in_recovery(),
  (SELECT coalesce(json_agg(x ORDER BY x.replay_behind_bytes DESC NULLS LAST), '[]') FROM (
     SELECT coalesce(nullif(r.application_name, ''), '(none)') AS application_name,
            coalesce(host(r.client_addr), 'local') AS client_addr, r.state, r.sync_state,
            round(extract(epoch FROM r.write_lag)::numeric, 3)::float AS write_lag_s,
            round(extract(epoch FROM r.flush_lag)::numeric, 3)::float AS flush_lag_s,
            round(extract(epoch FROM r.replay_lag)::numeric, 3)::float AS replay_lag_s,
            CASE WHEN pg_is_in_recovery() THEN NULL
                 ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), r.replay_lsn)::bigint END AS replay_behind_bytes,
            CASE WHEN pg_is_in_recovery() THEN NULL
                 ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), r.write_lsn)::bigint END AS write_behind_bytes
     FROM pg_stat_replication r LIMIT %(rows)s) x),
  (SELECT coalesce(json_agg(x ORDER BY x.retained_bytes DESC NULLS LAST), '[]') FROM (
     SELECT s.slot_name::text, s.slot_type, s.active, s.wal_status,
            CASE WHEN pg_is_in_recovery() OR s.restart_lsn IS NULL THEN NULL
                 ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint END AS retained_bytes
     FROM pg_replication_slots s LIMIT %(rows)s) x),
  CASE WHEN pg_is_in_recovery() THEN pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint END,
  CASE WHEN pg_is_in_recovery() THEN round(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::numeric, 3)::float END,
  CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END,
  (SELECT status FROM pg_stat_wal_receiver)"""

_MIN_S = {"type": "number", "minimum": 0}
OPERATIONS: dict[str, OperationSpec] = {
    "connections": OperationSpec(
        name="connections",
        description="Client connections against max_connections: counts by state, by application_name "
                    "(with idle-in-transaction counts), by client address and by database.",
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
    ),
    "idle_in_transaction": OperationSpec(
        name="idle_in_transaction",
        description="Sessions idle inside an open transaction for at least min_age_s seconds, oldest "
                    "transaction first, with application, client address, ages and last query.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"min_age_s": {**_MIN_S, "description": "idle at least this long (default 0)"}}},
    ),
    "long_running": OperationSpec(
        name="long_running",
        description="Queries active for at least min_s seconds, longest first, with what they wait on.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"min_s": {**_MIN_S, "description": "running at least this long (default 30)"}}},
    ),
    "blocking_chains": OperationSpec(
        name="blocking_chains",
        description="Lock waits: each blocked session with the pids blocking it (pg_blocking_pids), how long "
                    "it has waited, and the blocking sessions (root blockers first).",
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
    ),
    "replication": OperationSpec(
        name="replication",
        description="Streaming replication: on a primary each standby's state and how far behind it writes and "
                    "replays (bytes, lag), and each replication slot with the WAL it retains; on a standby the WAL "
                    "received but not replayed, the last replayed transaction's age, replay paused or not.",
        parameters={"type": "object", "properties": {}, "additionalProperties": False},
    ),
}

_PASSWORD_LITERAL = re.compile(r"(?i)(password\s*=?\s*)('(?:[^']|'')*'|\"[^\"]*\")")


def mask_query(text: str | None) -> str:
    """A session's query text with password literals masked (it may be someone's ALTER ROLE)."""
    return _PASSWORD_LITERAL.sub(r"\1'******'", text or "")



def connect_kwargs(*, timeout: float, application_name: str, user: str | None,
                   password: str | None) -> dict[str, Any]:
    """psycopg connect arguments of every agent session: bounded, read-only, autocommit (pure)."""
    kwargs: dict[str, Any] = {
        "connect_timeout": max(2, int(timeout + 0.999)),
        "application_name": application_name,
        "options": f"-c statement_timeout={max(1, int(timeout * 1000))} "
                   "-c default_transaction_read_only=on -c lock_timeout=1000",
        "autocommit": True,
    }
    if user is not None:
        kwargs["user"] = user
    if password is not None:
        kwargs["password"] = password
    return kwargs


class LazySession:
    """One agent session, opened on first use and thrown away after any failure: the ``postgres``
    tool's and the remediation executors' (agent.remediation.postgres.Database). A subclass sets
    ``dsn``, ``_user``, ``_password``, ``_application_name``, ``_conn = None`` and ``_lock``."""

    dsn: str
    _user: str | None
    _password: str | None
    _application_name: str
    _conn: Any  # psycopg.AsyncConnection, opened on first use
    _lock: asyncio.Lock

    async def close(self) -> None:
        async with self._lock:
            await self._discard()

    async def _open(self, timeout: float) -> Any:
        import psycopg  # an agent without PostgreSQL configured never needs it

        kwargs = connect_kwargs(timeout=timeout, application_name=self._application_name,
                                user=self._user, password=self._password)
        self._conn = await psycopg.AsyncConnection.connect(self.dsn, **kwargs)
        return self._conn

    async def _discard(self) -> None:
        """Close the connection within 2 s, never raising (its state is unknown after a failure or
        a cancellation); the next call opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:  # the connection is being thrown away; nothing left to do
                pass


class PostgresTool(LazySession):
    """Read-only diagnostics on one PostgreSQL server as ``user`` (the dynamic Vault user)."""

    name: ClassVar[str] = "postgres"
    credential_domain: ClassVar[str | None] = "database"

    def __init__(self, dsn: str, *, user: str | None = None, password: str | None = None,
                 limits: Limits | None = None, application_name: str = "agentjobs-agent",
                 query_chars: int = QUERY_CHARS, target: str = "default") -> None:
        self.dsn = dsn
        self.target = target  # the configured target (postgres.targets) this tool talks to
        self.limits = limits or Limits()
        self.query_chars = query_chars
        self._user, self._password = user, password
        self._application_name = application_name[:63]
        self._secrets = [s for s in (password, _dsn_password(dsn)) if s]
        self._conn: Any = None  # psycopg.AsyncConnection, opened on first use
        self._lock = asyncio.Lock()

    def operations(self) -> Mapping[str, OperationSpec]:
        return OPERATIONS

    @property
    def server(self) -> str:
        """``host:port`` of the server (what postgres-exporter labels its series ``server`` with)."""
        return dsn_location(self.dsn)[0]

    def describe_target(self) -> str:
        """``<target> (<host:port>/<database>)``: which source answered, for the finding."""
        server, db = dsn_location(self.dsn)
        return f"{self.target} ({server}/{db})" if server or db else self.target

    def _asked(self, sql: str) -> str:
        # The query text names the target, so every piece of evidence says which database answered.
        return f"-- postgres target {self.describe_target()}\n{sql}"

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
        try:
            args = {"rows": self.limits.max_rows, "chars": self.query_chars, "own": OWN_APPLICATION_PREFIX}
            if operation == "idle_in_transaction":
                args["min_s"] = parse_duration(params.get("min_age_s") or 0)
            elif operation == "long_running":
                args["min_s"] = parse_duration(30 if params.get("min_s") is None else params["min_s"])
        except ParamError as exc:
            return failure(self.name, operation, self._asked(""), f"invalid parameters: {exc}")
        sql = {"connections": CONNECTIONS_SQL, "idle_in_transaction": IDLE_IN_TRANSACTION_SQL,
               "long_running": LONG_RUNNING_SQL, "blocking_chains": BLOCKED_SQL,
               "replication": REPLICATION_SQL}[operation]
        import psycopg  # an agent without PostgreSQL configured never needs it

        try:
            # the bound covers waiting for the connection (calls on one tool are serialised) too
            async with asyncio.timeout(self.limits.timeout), self._lock:
                try:
                    conn = await self._connection()
                    data, excerpt, truncated = await getattr(self, f"_{operation}")(conn, args)
                except BaseException:
                    await self._discard()  # its state is unknown after a failure or a cancellation
                    raise
        except (TimeoutError, psycopg.Error, OSError) as exc:
            return failure(self.name, operation, self._asked(sql), describe_error(exc, self.limits.timeout),
                           secrets=self._secrets)
        return Observation(tool=self.name, operation=operation, query=self._asked(sql), ok=True, at=utcnow(), data=data,
                           excerpt=bounded(redact(excerpt, self._secrets)), truncated=truncated)

    # -- connection ----------------------------------------------------------------------

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        return await self._open(self.limits.timeout)

    # -- operations: each returns (data, excerpt, truncated) ------------------------------

    async def _connections(self, conn: Any, args: dict[str, Any]) -> tuple[Any, str, bool]:
        cur = await conn.execute(CONNECTIONS_SQL, args)
        row = await cur.fetchone()
        (max_conn, reserved, total, by_state, by_app, n_apps, by_client, n_clients, by_db, n_dbs,
         oldest, queried_as, excluded_own) = row
        data = {
            "max_connections": max_conn, "superuser_reserved_connections": reserved, "total": total,
            "usage_ratio": round(total / max(1, max_conn), 4),
            "by_state": {str(k): int(v) for k, v in sorted((by_state or {}).items(), key=lambda kv: -kv[1])},
            "by_application": by_app, "by_client": by_client, "by_database": by_db,
            "oldest_idle_in_transaction_s": oldest,
            "queried_as": queried_as,  # the (dynamic, Vault-issued) user this was observed as
            # agent sessions (this one included) left out of every count above
            "excluded_own": excluded_own,
            "target": self.target,
        }
        truncated = n_apps > len(by_app) or n_clients > len(by_client) or n_dbs > len(by_db)
        idle_tx = sum(v for k, v in data["by_state"].items() if k.startswith("idle in transaction"))
        lines = [
            f"client connections {total}/{max_conn} ({data['usage_ratio']:.0%} of max_connections, "
            f"{reserved} reserved for superusers); idle in transaction {idle_tx}, oldest {oldest:.0f} s",
            "by state: " + ", ".join(f"{k}={v}" for k, v in data["by_state"].items()),
            "by application_name: " + "; ".join(
                f"{a['application_name']} {a['total']} (active {a['active']}, idle {a['idle']}, "
                f"idle in transaction {a['idle_in_transaction']})" for a in by_app[:10]),
            "by client_addr: " + "; ".join(f"{c['client_addr']} {c['total']}" for c in by_client[:10]),
            "by database: " + "; ".join(f"{d['datname'] or '-'} {d['total']}" for d in by_db[:10]),
            f"(observed as {queried_as} on target {self.describe_target()}; {excluded_own} agent "
            f"session{'s' if excluded_own != 1 else ''} of our own not counted)",
        ]
        return data, "\n".join(lines), truncated

    async def _idle_in_transaction(self, conn: Any, args: dict[str, Any]) -> tuple[Any, str, bool]:
        cur = await conn.execute(IDLE_IN_TRANSACTION_SQL, args)
        rows = await cur.fetchall()
        cur = await conn.execute(IDLE_BY_APPLICATION_SQL, args)
        by_app = {app: n for app, n in await cur.fetchall()}
        total = rows[0][0] if rows else 0
        sessions = [self._session(r[1:]) for r in rows]
        data = {"total": total, "min_age_s": args["min_s"], "by_application": by_app, "sessions": sessions}
        lines = [f"{total} sessions idle in transaction for >= {args['min_s']:g} s; by application_name: "
                 + (", ".join(f"{k}={v}" for k, v in by_app.items()) or "none")]
        lines += [f"pid {s['pid']} {s['application_name'] or '-'} from {s['client_addr']} db {s['datname']}: "
                  f"transaction {s['xact_age_s']:.0f} s, idle {s['idle_s']:.0f} s"
                  f"{', wrote' if s['wrote'] else ''}; last query: {s['query']!r}" for s in sessions[:20]]
        return data, "\n".join(lines), total > len(sessions)

    async def _long_running(self, conn: Any, args: dict[str, Any]) -> tuple[Any, str, bool]:
        cur = await conn.execute(LONG_RUNNING_SQL, args)
        rows = await cur.fetchall()
        total = rows[0][0] if rows else 0
        sessions = [self._session(r[1:]) for r in rows]
        data = {"total": total, "min_s": args["min_s"], "sessions": sessions}
        lines = [f"{total} queries active for >= {args['min_s']:g} s"]
        lines += [f"pid {s['pid']} {s['application_name'] or '-'} from {s['client_addr']}: running "
                  f"{s['running_s']:.0f} s" + (f", waiting on {s['wait_event_type']}/{s['wait_event']}"
                                               if s["wait_event_type"] else "")
                  + f": {s['query']!r}" for s in sessions[:20]]
        return data, "\n".join(lines), total > len(sessions)

    async def _blocking_chains(self, conn: Any, args: dict[str, Any]) -> tuple[Any, str, bool]:
        async with conn.transaction():  # one statistics snapshot for both queries
            cur = await conn.execute(BLOCKED_SQL, args)
            rows = await cur.fetchall()
            blocked = []
            for r in rows:
                entry = self._session(r[3:])
                entry["blocked_by"] = sorted(int(p) for p in r[1])
                entry["lock_wait_s"] = r[2]
                blocked.append(entry)
            blocker_pids = sorted({p for b in blocked for p in b["blocked_by"]})[: self.limits.max_rows]
            blocker_rows = []
            if blocker_pids:
                cur = await conn.execute(BLOCKERS_SQL, {**args, "pids": blocker_pids})
                blocker_rows = await cur.fetchall()
        waiting = {b["pid"] for b in blocked}
        edges: dict[int, set[int]] = {}  # blocker -> sessions it blocks directly
        for b in blocked:
            for p in b["blocked_by"]:
                edges.setdefault(p, set()).add(b["pid"])
        blockers = []
        for r in blocker_rows:
            entry = self._session(r[1:])
            entry["backend_type"] = r[0]
            entry["blocks"] = sorted(edges.get(entry["pid"], ()))
            entry["blocks_total"] = len(_reachable(entry["pid"], edges))
            entry["waiting"] = entry["pid"] in waiting
            blockers.append(entry)
        blockers.sort(key=lambda e: (e["waiting"], -e["blocks_total"], e["pid"]))
        total = rows[0][0] if rows else 0
        roots = [e["pid"] for e in blockers if not e["waiting"]]
        data = {"blocked_total": total, "blocked": blocked, "blockers": blockers, "roots": roots}
        if not total:
            return data, "no session is waiting for a lock held by another", False
        lines = [f"{total} sessions blocked; root blockers: "
                 + (", ".join(str(p) for p in roots) or "none (a cycle, or they finished)")]
        # A waiter queued ahead of others also "blocks" them (pg_blocking_pids): it is named as a waiter,
        # never as a blocker, so only the sessions that wait on nobody read as the cause.
        lines += [f"{'queued waiter' if e['waiting'] else 'root blocker'} pid {e['pid']} "
                  f"{e['application_name'] or '-'} from {e['client_addr']} ({e['state']}, "
                  f"transaction {int(e['xact_age_s'] or 0)} s) "
                  f"{'is itself waiting, ahead of' if e['waiting'] else 'blocks'} {e['blocks_total']}: {e['query']!r}"
                  for e in blockers[:10]]
        lines += [f"blocked pid {b['pid']} {b['application_name'] or '-'} waits {b['lock_wait_s']:.1f} s on "
                  f"{b['blocked_by']}: {b['query']!r}" for b in blocked[:20]]
        return data, "\n".join(lines), total > len(blocked)

    async def _replication(self, conn: Any, args: dict[str, Any]) -> tuple[Any, str, bool]:
        cur = await conn.execute(REPLICATION_SQL, args)
        row = await cur.fetchone()
        in_recovery, standbys, slots, unreplayed, replay_age, pause_state, receiver = row
        data = {"in_recovery": bool(in_recovery), "standbys": standbys or [], "slots": slots or [],
                "received_not_replayed_bytes": unreplayed, "last_replay_age_s": replay_age,
                "replay_pause_state": pause_state, "wal_receiver_status": receiver}
        if in_recovery:
            lines = [f"this server is a standby: WAL receiver {receiver or 'not running'}; "
                     f"{mib(unreplayed or 0)} received but not replayed; last replayed transaction "
                     + (f"{replay_age:.0f} s ago" if replay_age is not None else "unknown")
                     + f"; replay {pause_state or 'not paused'}"]
        else:
            lines = [f"this server is a primary with {len(data['standbys'])} standby(s) and "
                     f"{len(data['slots'])} replication slot(s)"]
        lines += [f"standby {r['application_name']} from {r['client_addr']} ({r['state']}, {r['sync_state']}): "
                  f"writes {mib(r['write_behind_bytes'] or 0)} behind, replays {mib(r['replay_behind_bytes'] or 0)} "
                  f"behind (replay_lag {r['replay_lag_s'] if r['replay_lag_s'] is not None else '-'} s)"
                  for r in data["standbys"][:20]]
        lines += [f"slot {s['slot_name']} ({s['slot_type']}, {'active' if s['active'] else 'inactive'}"
                  f"{', wal_status ' + s['wal_status'] if s['wal_status'] else ''}): retains "
                  + (mib(s["retained_bytes"]) if s["retained_bytes"] is not None else "no WAL (never reserved)")
                  for s in data["slots"][:20]]
        truncated = len(data["standbys"]) >= args["rows"] or len(data["slots"]) >= args["rows"]
        return data, "\n".join(lines), truncated

    def _session(self, row: tuple[Any, ...]) -> dict[str, Any]:
        entry = dict(zip(_SESSION_KEYS, row, strict=True))
        entry["query"] = redact(mask_query(entry["query"]), self._secrets)
        return entry


def mib(n: float) -> str:
    """``n`` bytes as MiB, one decimal under 10 (pure)."""
    value = n / 1048576
    return f"{value:.1f} MiB" if value < 10 else f"{value:.0f} MiB"


def _reachable(start: int, edges: Mapping[int, set[int]]) -> set[int]:
    seen: set[int] = set()
    todo = list(edges.get(start, ()))
    while todo:
        pid = todo.pop()
        if pid not in seen and pid != start:
            seen.add(pid)
            todo.extend(edges.get(pid, ()))
    return seen


def dsn_location(dsn: str) -> tuple[str, str]:
    """(``host:port``, database) of a DSN, URL or key=value, without credentials (pure); "" when absent."""
    from urllib.parse import unquote, urlsplit

    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            port = parts.port or 5432
        except ValueError:
            return "", ""
        host = parts.hostname or ""
        return (f"{host}:{port}" if host else ""), unquote(parts.path.lstrip("/"))
    pairs = dict(re.findall(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn))
    host = pairs.get("host", "").strip("'")
    port = pairs.get("port", "5432").strip("'")
    return (f"{host}:{port}" if host else ""), pairs.get("dbname", "").strip("'")


def _dsn_password(dsn: str) -> str | None:
    """The password embedded in a DSN (URL or key=value), so it can be redacted."""
    from urllib.parse import unquote, urlsplit

    if "://" in dsn:
        try:
            password = urlsplit(dsn).password
        except ValueError:
            return None
        return unquote(password) if password else None
    match = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    return match.group(1).strip("'") if match else None
