"""Executors for the PostgreSQL actions: ``terminate_backend`` and ``terminate_idle_backends``.

They connect with the agent's own database credentials — the Vault-issued user of
the Job's phase, the same one the ``postgres`` tool uses — never a superuser. Only
the remediation phases' role can signal other backends (membership in
``pg_signal_backend``); in the other phases ``pg_terminate_backend`` is refused by
PostgreSQL itself, whatever the gate said. The session is read-only
(``pg_terminate_backend`` needs no write) with a statement and lock timeout.

**terminate_backend** (params ``pid`` and what the finding knows about the session:
``application_name``, ``usename``, ``backend_start``, ``observed_at`` with
``xact_age_s``). The precondition, right before acting: the pid is a client backend
(not ours, not an agentjobs agent), it still blocks at least one other backend
(``pg_blocking_pids``), and it is still the session the finding saw — same
application and user, started no later than the observation (or than this
executor, when the proposal says nothing about time: a pid reused since is never
the one observed), the same ``backend_start`` when given, and the same transaction
when its age was given. The act terminates only a backend with that pid *and* the
``backend_start`` the precondition saw, in one statement. Verify: within the wait the
pid is gone and nobody waits on it any more.

**terminate_idle_backends** (params ``application_name`` or ``client_addr``, and
``min_idle_s``): the sessions of one application (or client address) idle in a
transaction for at least ``min_idle_s``, at most ``max_sessions`` of them, never ours.
Verify: those sessions are gone and none of that application is idle that long.

Neither can be undone: a terminated session's transaction was rolled back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from schemas import ProposedAction

from ..tools.postgres import LazySession
from .protocol import Execution, no_undo

AGENT_APPLICATION = "agentjobs-agent"  # prefix of the agent's own sessions (tool and executors)
NO_APPLICATION = "(none)"  # the tool's placeholder for an empty application_name
SLACK_S = 1.0  # seconds of tolerance when comparing the observation's clock with the server's
POLL_S = 0.1
MAX_SESSIONS = 50  # terminate_idle_backends: refuse to end more sessions than this at once

# Every lock wait with whom it waits for (pg_blocking_pids): who the blocker blocks, directly or through others.
_LOCK_WAITS = """(SELECT coalesce(json_agg(json_build_array(w.pid, pg_blocking_pids(w.pid))), '[]')
        FROM pg_stat_activity w WHERE w.wait_event_type = 'Lock')"""

SESSION_SQL = f"""\
SELECT a.backend_type, a.usename::text, coalesce(a.application_name, ''), a.backend_start,
       extract(epoch FROM now() - a.backend_start)::float8,
       extract(epoch FROM now() - a.xact_start)::float8,
       a.pid = pg_backend_pid(), coalesce(a.state, ''), {_LOCK_WAITS}
FROM pg_stat_activity a WHERE a.pid = %(pid)s AND a.datname = current_database()"""

# Only sessions of the Job's own database: its allow-list names that one, and a server hosts others.
TERMINATE_SQL = """\
SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
WHERE a.pid = %(pid)s AND a.backend_start = %(backend_start)s AND a.datname = current_database()"""

GONE_SQL = f"""\
SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = %(pid)s AND backend_start = %(backend_start)s),
       {_LOCK_WAITS}"""

_IDLE_WHERE = """\
a.backend_type = 'client backend' AND a.pid <> pg_backend_pid() AND a.datname = current_database()
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND now() - a.state_change >= make_interval(secs => %(min_s)s)
  AND coalesce(a.application_name, '') NOT LIKE 'agentjobs-agent%%'
  AND {selector}"""
_BY_APPLICATION = "coalesce(a.application_name, '') = %(value)s"
_BY_CLIENT = "coalesce(host(a.client_addr), 'local') = %(value)s"

IDLE_SQL = f"SELECT a.pid, a.backend_start FROM pg_stat_activity a WHERE {_IDLE_WHERE} ORDER BY a.pid"
TERMINATE_IDLE_SQL = """\
SELECT a.pid, a.backend_start, pg_terminate_backend(a.pid) FROM pg_stat_activity a
WHERE (a.pid, a.backend_start) IN (SELECT * FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]))
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)') AND a.datname = current_database()"""
STILL_THERE_SQL = """\
SELECT a.pid FROM pg_stat_activity a
WHERE (a.pid, a.backend_start) IN (SELECT * FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]))"""


class Database(LazySession):
    """One lazily opened connection as the agent's own database user, shared by the executors."""

    def __init__(self, dsn: str, *, user: str | None = None, password: str | None = None,
                 timeout: float = 5.0, application_name: str = f"{AGENT_APPLICATION} remediation",
                 before_connect: Callable[[], Awaitable[None]] | None = None) -> None:
        """``before_connect``: run before opening the connection — the engine passes the postgres tool's
        ``close``, so that on a server out of connection slots the executor takes the tool's slot
        (the diagnosis is over by then) instead of needing one more."""
        self.dsn = dsn
        self._before_connect = before_connect
        self.timeout = timeout
        self._user, self._password = user, password
        self._application_name = application_name[:63]
        self._secrets = [s for s in (password,) if s]
        self._conn: Any = None
        self._lock = asyncio.Lock()

    async def rows(self, sql: str, args: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        import psycopg

        async with asyncio.timeout(self.timeout), self._lock:
            try:
                conn = await self._connection()
                cur = await conn.execute(sql, args)
                return list(await cur.fetchall())
            except BaseException as exc:
                await self._discard()  # its state is unknown after a failure or a cancellation
                if isinstance(exc, psycopg.Error):
                    raise DatabaseError(self.describe(exc)) from None
                raise

    def describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        for secret in self._secrets:
            text = text.replace(secret, "******")
        return text

    async def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._before_connect is not None:
            before, self._before_connect = self._before_connect, None
            await before()
        return await self._open(self.timeout)


class DatabaseError(Exception):
    """A PostgreSQL error, described without secrets."""


def _pid(action: ProposedAction) -> int | None:
    raw = str(action.params.get("pid", "")).strip()
    return int(raw) if raw.isdigit() and 0 < int(raw) < 2**31 else None


def _app(name: str | None) -> str:
    return "" if name in (None, NO_APPLICATION) else str(name)


def _time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    try:
        t = datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _seconds(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One session as the precondition saw it."""

    pid: int
    backend_type: str
    usename: str | None
    application_name: str
    backend_start: datetime | None
    backend_age_s: float | None
    xact_age_s: float | None
    ours: bool
    state: str
    waiters: tuple[int, ...]  # sessions waiting for a lock this one holds
    blocked: tuple[int, ...] = ()  # sessions it blocks directly or through others (waiters included)

    def describe(self) -> str:
        started = self.backend_start.isoformat() if self.backend_start else "?"
        blocked = self.blocked or self.waiters
        return (f"pid {self.pid} (user {self.usename or '?'}, application {self.application_name or '(none)'}, "
                f"{self.state or 'no state'}, backend started {started}) blocked {len(blocked)} session(s) "
                f"({len(self.waiters)} directly): " + ", ".join(map(str, blocked[:20]))
                + (" …" if len(blocked) > 20 else ""))


def lock_waits(raw: Any) -> dict[int, frozenset[int]]:
    """``[[pid, [blocking pids]], ...]`` as {waiting pid: who it waits for} (pure)."""
    out: dict[int, frozenset[int]] = {}
    for item in raw or ():
        try:
            pid, by = item
            out[int(pid)] = frozenset(int(p) for p in by or ())
        except (TypeError, ValueError):
            continue
    return out


def blocked_by(pid: int, waits: Mapping[int, frozenset[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sessions waiting on ``pid`` directly, all sessions it blocks directly or through others) (pure)."""
    direct = tuple(sorted(w for w, by in waits.items() if pid in by))
    seen: set[int] = set()
    todo = list(direct)
    while todo:
        w = todo.pop()
        if w in seen or w == pid:
            continue
        seen.add(w)
        todo.extend(x for x, by in waits.items() if w in by)
    return direct, tuple(sorted(seen))


def stale_backend(action: ProposedAction, seen: Backend | None, *, pid: int, elapsed_s: float,
                  slack_s: float = SLACK_S) -> str | None:
    """Why ``seen`` is no longer the session the finding asked to terminate, or None (pure).

    ``elapsed_s``: seconds since the observation (``observed_at``) or, without one, since the
    executor was made — a session younger than that cannot be the one observed.
    """
    p = action.params
    if seen is None:
        return f"pid {pid} no longer exists"
    if seen.ours:
        return f"pid {pid} is the executor's own session"
    if seen.backend_type != "client backend":
        return f"pid {pid} is a {seen.backend_type or 'background'} process, not a client session"
    if seen.usename is None or seen.backend_start is None or seen.backend_age_s is None:
        return f"pid {pid}'s session details are not visible to this role (it needs pg_read_all_stats)"
    if seen.application_name.startswith(AGENT_APPLICATION):
        return f"pid {pid} is an agentjobs agent session"
    if "application_name" in p and _app(p["application_name"]) != seen.application_name:
        return (f"pid {pid} now belongs to application {seen.application_name or '(none)'!r}, not "
                f"{_app(p['application_name']) or '(none)'!r}: the session the finding named has ended")
    if p.get("usename") and p["usename"] != seen.usename:
        return f"pid {pid} now belongs to user {seen.usename!r}, not {p['usename']!r}"
    want_start = _time(p.get("backend_start"))
    if p.get("backend_start") and want_start is None:
        return f"backend_start {p['backend_start']!r} is not a timestamp with a time zone"
    if want_start is not None and abs((seen.backend_start - want_start).total_seconds()) > 0.001:
        return (f"pid {pid} is a session started at {seen.backend_start.isoformat()}, not the one started at "
                f"{want_start.isoformat()}: the pid was reused")
    if seen.backend_age_s < elapsed_s - slack_s:
        return (f"pid {pid} is a session started {seen.backend_age_s:.1f} s ago, after the finding observed it "
                f"({elapsed_s:.1f} s ago): the pid was reused")
    xact_age = _seconds(p.get("xact_age_s"))
    if xact_age is not None and xact_age > 0 and "observed_at" in p:
        if seen.xact_age_s is None:
            return f"pid {pid} has no open transaction any more: the transaction the finding saw ended"
        if seen.xact_age_s < xact_age + elapsed_s - slack_s:
            return (f"pid {pid}'s transaction began {seen.xact_age_s:.1f} s ago, after the one the finding saw "
                    f"(which was {xact_age:.1f} s old {elapsed_s:.1f} s ago): that transaction ended")
    if not seen.waiters:
        return f"pid {pid} no longer blocks any session"
    return None


class TerminateBackend:
    """``terminate_backend`` through the protocol (see the module docstring)."""

    action: ClassVar[str] = "terminate_backend"
    volatile_params: frozenset[str] = frozenset({"observed_at", "xact_age_s"})

    def __init__(self, db: Database, *, verify_timeout: float = 5.0, clock: Callable[[], float] = time.time,
                 slack_s: float = SLACK_S) -> None:
        self.db = db
        self.verify_timeout = verify_timeout
        self.clock = clock
        self.slack_s = slack_s
        self.since = clock()  # made when the investigation began: anything younger was never observed
        self._checked: dict[int, Backend] = {}
        self._after: dict[int, str] = {}

    async def _session(self, pid: int) -> Backend | None:
        rows = await self.db.rows(SESSION_SQL, {"pid": pid})
        if not rows:
            return None
        btype, user, app, start, age, xact_age, ours, state, waits = rows[0]
        direct, blocked = blocked_by(pid, lock_waits(waits))
        return Backend(pid=pid, backend_type=btype or "", usename=user, application_name=app, backend_start=start,
                       backend_age_s=age, xact_age_s=xact_age, ours=bool(ours), state=state, waiters=direct,
                       blocked=blocked)

    def _elapsed(self, action: ProposedAction) -> float:
        observed = _time(action.params.get("observed_at"))
        ref = observed.timestamp() if observed is not None else self.since
        return max(0.0, self.clock() - ref)

    async def precondition(self, action: ProposedAction) -> str | None:
        pid = _pid(action)
        if pid is None:
            return f"no valid pid in the proposal ({action.params.get('pid', '')!r})"
        if action.params.get("observed_at") and _time(action.params["observed_at"]) is None:
            return f"observed_at {action.params['observed_at']!r} is not a timestamp with a time zone"
        seen = await self._session(pid)
        why = stale_backend(action, seen, pid=pid, elapsed_s=self._elapsed(action), slack_s=self.slack_s)
        if why is None and seen is not None:
            self._checked[pid] = seen
        return why

    async def act(self, action: ProposedAction) -> Execution:
        pid = _pid(action)
        seen = self._checked.get(pid) if pid is not None else None
        if pid is None or seen is None:
            return Execution(ok=False, error="the precondition was not checked; not acting")
        try:
            rows = await self.db.rows(TERMINATE_SQL, {"pid": pid, "backend_start": seen.backend_start})
        except DatabaseError as exc:
            return Execution(ok=False, before=seen.describe(), error=str(exc))
        if not rows:
            return Execution(ok=False, before=seen.describe(),
                             error=f"pid {pid} ended between the check and the act; nothing was signalled")
        if not rows[0][0]:
            return Execution(ok=False, before=seen.describe(), error=f"pg_terminate_backend({pid}) returned false")
        return Execution(ok=True, before=seen.describe(), after=f"pg_terminate_backend({pid}) signalled it")

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        pid = _pid(action)
        seen = self._checked.get(pid) if pid is not None else None
        if pid is None or seen is None:
            return False
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            exists, raw = (await self.db.rows(GONE_SQL, {"pid": pid, "backend_start": seen.backend_start}))[0]
            waits = lock_waits(raw)
            on_it = [w for w, by in waits.items() if pid in by]
            drained = not exists and not on_it
            blocked = seen.blocked or seen.waiters
            still = [w for w in blocked if w in waits]
            self._after[pid] = (
                f"pid {pid} {'still exists' if exists else 'is gone'}; {len(on_it)} session(s) wait on it; "
                f"of the {len(blocked)} it blocked, {len(blocked) - len(still)} no longer wait for a lock"
                + (f" ({len(still)} now wait on others)" if still and drained else ""))
            if drained or time.monotonic() >= deadline:
                return drained
            await asyncio.sleep(POLL_S)

    def observed_after(self, action: ProposedAction) -> str:
        pid = _pid(action)
        return self._after.get(pid, "") if pid is not None else ""

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return no_undo("a terminated session cannot be restored; its transaction was rolled back")


class TerminateIdleBackends:
    """``terminate_idle_backends`` through the protocol (see the module docstring)."""

    action: ClassVar[str] = "terminate_idle_backends"
    volatile_params: frozenset[str] = frozenset()

    def __init__(self, db: Database, *, verify_timeout: float = 5.0, max_sessions: int = MAX_SESSIONS) -> None:
        self.db = db
        self.verify_timeout = verify_timeout
        self.max_sessions = max_sessions
        self._checked: dict[tuple[str, str, float], list[tuple[int, datetime]]] = {}
        self._ended: dict[tuple[str, str, float], list[tuple[int, datetime]]] = {}
        self._after: dict[tuple[str, str, float], str] = {}

    @staticmethod
    def selector(action: ProposedAction) -> tuple[str, str, float] | str:
        """(column, value, min_idle_s), or why the params do not name one set of sessions (pure)."""
        p = action.params
        given = [k for k in ("application_name", "client_addr") if p.get(k, "") != ""]
        if len(given) != 1:
            return "the proposal must name exactly one of application_name or client_addr"
        min_s = _seconds(p.get("min_idle_s", "60"))
        if min_s is None:
            return f"min_idle_s {p.get('min_idle_s')!r} is not a number of seconds"
        value = _app(p[given[0]]) if given[0] == "application_name" else p[given[0]]
        if given[0] == "application_name" and (not value or value.startswith(AGENT_APPLICATION)):
            return f"application_name {value or '(none)'!r} cannot be targeted"
        return given[0], value, min_s

    def _what(self, sel: tuple[str, str, float]) -> str:
        return f"sessions of {sel[0]} {sel[1]!r} idle in transaction for >= {sel[2]:g} s"

    async def _idle(self, sel: tuple[str, str, float]) -> list[tuple[int, datetime]]:
        sql = IDLE_SQL.format(selector=_BY_APPLICATION if sel[0] == "application_name" else _BY_CLIENT)
        return [(int(pid), start) for pid, start in await self.db.rows(sql, {"value": sel[1], "min_s": sel[2]})]

    async def precondition(self, action: ProposedAction) -> str | None:
        sel = self.selector(action)
        if isinstance(sel, str):
            return sel
        found = await self._idle(sel)
        if not found:
            return f"no {self._what(sel)} any more"
        if len(found) > self.max_sessions:
            return f"{len(found)} {self._what(sel)}: more than the {self.max_sessions} one action may end"
        self._checked[sel] = found
        return None

    async def act(self, action: ProposedAction) -> Execution:
        sel = self.selector(action)
        found = self._checked.get(sel) if not isinstance(sel, str) else None
        if isinstance(sel, str) or not found:
            return Execution(ok=False, error="the precondition was not checked; not acting")
        before = f"{len(found)} {self._what(sel)}: pids {', '.join(str(p) for p, _ in found[:50])}"
        try:
            rows = await self.db.rows(TERMINATE_IDLE_SQL, {"pids": [p for p, _ in found],
                                                           "starts": [s for _, s in found]})
        except DatabaseError as exc:
            return Execution(ok=False, before=before, error=str(exc))
        ended = [(int(pid), start) for pid, start, ok in rows if ok]
        self._ended[sel] = ended
        if not ended:
            return Execution(ok=False, before=before,
                             error="none of them could be signalled (they ended or moved on)")
        return Execution(ok=True, before=before, after=f"pg_terminate_backend signalled {len(ended)}: pids "
                                                       + ", ".join(str(p) for p, _ in ended[:50]))

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        sel = self.selector(action)
        if isinstance(sel, str) or sel not in self._ended:
            return False
        ended = self._ended[sel]
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            still = await self.db.rows(STILL_THERE_SQL, {"pids": [p for p, _ in ended],
                                                         "starts": [s for _, s in ended]})
            idle = await self._idle(sel)
            done = not still and not idle
            self._after[sel] = (f"{len(ended) - len(still)} of the {len(ended)} terminated sessions are gone; "
                                f"{len(idle)} {self._what(sel)} now")
            if done or time.monotonic() >= deadline:
                return done
            await asyncio.sleep(POLL_S)

    def observed_after(self, action: ProposedAction) -> str:
        sel = self.selector(action)
        return "" if isinstance(sel, str) else self._after.get(sel, "")

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return no_undo("terminated sessions cannot be restored; their open transactions were rolled back")


def executors(db: Database, *, verify_timeout: float = 5.0) -> dict[str, Any]:
    """The PostgreSQL executors, by action name, sharing ``db``."""
    return {TerminateBackend.action: TerminateBackend(db, verify_timeout=verify_timeout),
            TerminateIdleBackends.action: TerminateIdleBackends(db, verify_timeout=verify_timeout)}
