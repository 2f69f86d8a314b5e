"""Observability services for tool tests: Prometheus, the postgres exporter, Loki, induced DB states.

* :class:`Prometheus` / :class:`PostgresExporter` — Debian's ``prometheus`` and
  ``prometheus-postgres-exporter`` as private processes: own config and data in
  a temp dir, free loopback ports, stopped (SIGTERM, then SIGKILL) afterwards.
  Configs are written as JSON, which is YAML, so no YAML library is needed.
* :class:`LokiDouble` — Grafana Loki is not packaged by Debian (Debian's
  ``loki`` package is an unrelated genetics program), so Loki's HTTP API — the
  push API and the query endpoints the ``logs`` tool uses, with a LogQL subset
  (stream selectors, line filters, ``count_over_time``/``rate`` under
  ``sum [by (...)]``) — is served in memory, speaking the real wire format.
  Unsupported LogQL is a 400 with a parse-error text, like Loki's.
* :class:`HangingServer` — accepts connections and never answers (timeouts).
* Induced PostgreSQL states: :func:`stats_reader_role`,
  :func:`idle_in_transaction`, :func:`blocking_chain`,
  :func:`long_running_query`.

Plain Python (no pytest) so end-to-end fixtures and benchmarks can reuse it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import math
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from .services import free_port, wait_until

PROMETHEUS = shutil.which("prometheus")
POSTGRES_EXPORTER = shutil.which("prometheus-postgres-exporter") or shutil.which("postgres_exporter")
PROMETHEUS_MISSING = "prometheus binary not found (install the Debian package prometheus; .ci/run does)"
EXPORTER_MISSING = ("prometheus-postgres-exporter binary not found "
                    "(install the Debian package prometheus-postgres-exporter; .ci/run does)")

_RUNNING: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    # The processes run in their own session (Ctrl-C reaches our teardown first), so an
    # interrupted run that never reached its teardown would otherwise leave them behind.
    for proc in list(_RUNNING):
        proc.kill()


# --------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------- #


class ManagedProcess:
    """A private server process with a log file, a readiness URL and a clean stop."""

    what = "process"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{self.what}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    ready_path = "/-/ready"

    async def start(self, timeout: float = 20.0) -> None:
        def spawn() -> None:
            with open(self.log_path, "wb") as log:
                self._proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env(),
                                              start_new_session=True)
            _RUNNING.add(self)

        await asyncio.to_thread(spawn)

        async def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited early:\n{self.log_tail()}")
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                    http.get(self.url + self.ready_path) as resp,
                ):
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        try:
            await wait_until(ready, timeout=timeout, what=f"{self.what} {self.ready_path} at {self.url}")
        except BaseException:
            await asyncio.to_thread(self.stop)
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Prometheus(ManagedProcess):
    """Debian's ``prometheus`` with its own config and TSDB; 1 s scrape and rule evaluation.

    Note: Prometheus hands new targets to its scrapers after a 5 s discovery
    throttle, so the first samples arrive ~5–6 s after start; start it once per
    module and use :meth:`wait_for_series`.
    """

    what = "prometheus"

    def __init__(self, workdir: Path, *, scrape_configs: Sequence[Mapping[str, Any]] = (),
                 scrape_self: bool = True, rule_groups: Sequence[Mapping[str, Any]] = (),
                 alertmanagers: Sequence[str] = (), interval: str = "1s") -> None:
        super().__init__(workdir)
        self.config_path = workdir / "prometheus.yml"
        jobs = [dict(job) for job in scrape_configs]
        if scrape_self:
            jobs.insert(0, {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{self.port}"]}]})
        config: dict[str, Any] = {"global": {"scrape_interval": interval, "scrape_timeout": interval,
                                             "evaluation_interval": interval},
                                  "scrape_configs": jobs}
        if rule_groups:
            rules_path = workdir / "rules.yml"
            rules_path.write_text(json.dumps({"groups": list(rule_groups)}, indent=2))
            config["rule_files"] = [str(rules_path)]
        if alertmanagers:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [
                a.removeprefix("http://") for a in alertmanagers]}]}]}
        self.config_path.write_text(json.dumps(config, indent=2))
        self.jobs = [str(job["job_name"]) for job in jobs]

    async def wait_for_targets(self, *, timeout: float = 30.0) -> None:
        """Await the first successful scrape of every configured job (each has its own offset
        within the scrape interval: one job's first sample says nothing about another's)."""
        for job in self.jobs:
            await self.wait_for_series(f'up{{job="{job}"}} == 1', timeout=timeout)

    def argv(self) -> list[str]:
        if PROMETHEUS is None:
            raise FileNotFoundError(PROMETHEUS_MISSING)
        return [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle", "--log.level=warn"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """``/api/v1/query`` result (raises on an error answer)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"{self.url}/api/v1/query", params={"query": expr}) as resp,
        ):
            body = await resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    async def wait_for_series(self, expr: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Await ``expr`` returning at least one series; returns them."""
        found: list[dict[str, Any]] = []

        async def probe() -> bool:
            nonlocal found
            found = await self.query(expr)
            return bool(found)

        await wait_until(probe, timeout=timeout, what=f"prometheus series for {expr!r}")
        return found


class PostgresExporter(ManagedProcess):
    """Debian's ``prometheus-postgres-exporter`` for one DSN (``pg_stat_activity_count`` etc.)."""

    what = "postgres-exporter"
    ready_path = "/metrics"

    def __init__(self, workdir: Path, dsn: str) -> None:
        super().__init__(workdir)
        self.dsn = dsn if "sslmode=" in dsn else dsn + ("&" if "?" in dsn else "?") + "sslmode=disable"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        if POSTGRES_EXPORTER is None:
            raise FileNotFoundError(EXPORTER_MISSING)
        return [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def env(self) -> dict[str, str]:
        return {"DATA_SOURCE_NAME": self.dsn, "PATH": "/usr/bin:/bin"}


@contextlib.asynccontextmanager
async def running(proc: ManagedProcess, *, timeout: float = 20.0) -> AsyncIterator[ManagedProcess]:
    """Start ``proc``, yield it, stop it."""
    await proc.start(timeout=timeout)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


@contextlib.contextmanager
def workdir(prefix: str) -> Any:
    path = Path(tempfile.mkdtemp(prefix=f"agentjobs-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- #
# small HTTP servers
# --------------------------------------------------------------------------- #


class HangingServer:
    """Accepts TCP connections, reads what comes, never answers: a server that hangs."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> HangingServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class MetricsServer:
    """A tiny ``/metrics`` endpoint (text exposition format) whose samples a test sets."""

    def __init__(self) -> None:
        self.samples: dict[str, float] = {}  # 'name{labels}' -> value
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _metrics(self, _: web.Request) -> web.Response:
        body = "".join(f"{k} {v!r}\n" for k, v in self.samples.items())
        return web.Response(text=body, content_type="text/plain")

    async def __aenter__(self) -> MetricsServer:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


# --------------------------------------------------------------------------- #
# Loki (wire-level double)
# --------------------------------------------------------------------------- #


class LogQLError(ValueError):
    """Unsupported or malformed LogQL (answered as 400 like Loki's parse errors)."""


_MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')
_FILTER = re.compile(r'\s*(\|=|!=|\|~|!~)\s*("(?:[^"\\]|\\.)*"|`[^`]*`)\s*')
_SUM = re.compile(r"^\s*sum\s*(?:(by|without)\s*\(([^)]*)\)\s*)?\((.*)\)\s*$", re.S)
_RANGE_FN = re.compile(r"^\s*(count_over_time|rate)\s*\((.*)\[\s*(\d+(?:ms|s|m|h|d))\s*\]\s*\)\s*$", re.S)
_DUR = re.compile(r"(\d+)(ms|s|m|h|d)")
_DUR_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _unquote(token: str) -> str:
    return token[1:-1] if token.startswith("`") else json.loads(token)


@dataclass(frozen=True)
class LogQuery:
    matchers: tuple[tuple[str, str, str], ...]
    filters: tuple[tuple[str, str], ...]

    def selects(self, labels: Mapping[str, str]) -> bool:
        for name, op, value in self.matchers:
            have = labels.get(name, "")
            ok = {"=": have == value, "!=": have != value,
                  "=~": re.fullmatch(value, have) is not None, "!~": re.fullmatch(value, have) is None}[op]
            if not ok:
                return False
        return True

    def keeps(self, line: str) -> bool:
        for op, arg in self.filters:
            ok = {"|=": arg in line, "!=": arg not in line,
                  "|~": re.search(arg, line) is not None, "!~": re.search(arg, line) is None}[op]
            if not ok:
                return False
        return True


@dataclass(frozen=True)
class MetricQuery:
    fn: str  # count_over_time | rate
    inner: LogQuery
    range_s: float
    grouping: str | None  # None: no sum; "by" / "without"
    labels: tuple[str, ...]


def parse_logql(text: str) -> LogQuery | MetricQuery:
    """The LogQL subset the double serves; raises ``LogQLError``."""
    summed = _SUM.match(text)
    body, grouping, labels = text, None, ()
    if summed:
        grouping = summed.group(1) or "by"
        labels = tuple(s.strip() for s in (summed.group(2) or "").split(",") if s.strip())
        body = summed.group(3)
    fn = _RANGE_FN.match(body)
    if fn:
        amount, unit = _DUR.fullmatch(fn.group(3)).groups()  # type: ignore[union-attr]
        return MetricQuery(fn.group(1), _parse_log_query(fn.group(2)), int(amount) * _DUR_S[unit], grouping, labels)
    if summed:
        raise LogQLError("parse error: only count_over_time/rate under sum are supported by this Loki double")
    return _parse_log_query(text)


def _parse_log_query(text: str) -> LogQuery:
    text = text.strip()
    if not text.startswith("{") or "}" not in text:
        raise LogQLError(f"parse error at line 1, col 1: syntax error: unexpected {text[:1]!r}, expecting {{")
    close = text.index("}")
    inside, rest = text[1:close], text[close + 1:]
    matchers = []
    for part in _split_matchers(inside):
        m = _MATCHER.fullmatch(part)
        if not m:
            raise LogQLError(f"parse error: invalid matcher {part.strip()!r}")
        matchers.append((m.group(1), m.group(2), json.loads(f'"{m.group(3)}"')))
    if not any(op in ("=", "=~") for _, op, _ in matchers):
        raise LogQLError("parse error: queries require at least one equality matcher")
    filters = []
    pos = 0
    while pos < len(rest):
        m = _FILTER.match(rest, pos)
        if not m:
            if rest[pos:].strip():
                raise LogQLError(f"parse error: unsupported pipeline stage {rest[pos:].strip()[:40]!r}")
            break
        arg = _unquote(m.group(2))
        if m.group(1) in ("|~", "!~"):
            try:
                re.compile(arg)
            except re.error as exc:
                raise LogQLError(f"parse error: invalid regex {arg!r}: {exc}") from None
        filters.append((m.group(1), arg))
        pos = m.end()
    return LogQuery(tuple(matchers), tuple(filters))


def _split_matchers(inside: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for ch in inside:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def _parse_ts_ns(value: str | None, default_ns: int) -> int:
    if not value:
        return default_ns
    if re.fullmatch(r"\d{13,}", value):
        return int(value)
    try:
        return int(float(value) * 1e9)
    except ValueError:
        from datetime import datetime

        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)


class LokiDouble:
    """Loki's HTTP API in memory: push, query_range, query, labels, ready."""

    def __init__(self) -> None:
        self.streams: dict[tuple[tuple[str, str], ...], list[tuple[int, str]]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, query params)
        self.tenants: list[str | None] = []  # X-Scope-OrgID of each query
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LokiDouble:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_get("/ready", self._ready)
        app.router.add_post("/loki/api/v1/push", self._push)
        app.router.add_get("/loki/api/v1/query_range", self._query_range)
        app.router.add_get("/loki/api/v1/query", self._query)
        app.router.add_get("/loki/api/v1/labels", self._labels)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- handlers ------------------------------------------------------------------------

    @staticmethod
    async def _ready(_: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def _push(self, request: web.Request) -> web.Response:
        if not request.content_type.endswith("json"):
            return web.Response(status=415, text="this Loki double accepts only JSON pushes\n")
        try:
            body = await request.json()
            for stream in body["streams"]:
                key = tuple(sorted((str(k), str(v)) for k, v in stream["stream"].items()))
                entries = self.streams.setdefault(key, [])
                entries.extend((int(ts), str(line)) for ts, line, *_ in stream["values"])
                entries.sort()
        except (ValueError, KeyError, TypeError) as exc:
            return web.Response(status=400, text=f"loghttp: invalid push payload: {exc}\n")
        return web.Response(status=204)

    async def _labels(self, request: web.Request) -> web.Response:
        names = sorted({k for key in self.streams for k, _ in key})
        return web.json_response({"status": "success", "data": names})

    def _parse(self, request: web.Request) -> LogQuery | MetricQuery:
        self.requests.append((request.path, dict(request.query)))
        self.tenants.append(request.headers.get("X-Scope-OrgID"))
        return parse_logql(request.query.get("query", ""))

    async def _query_range(self, request: web.Request) -> web.Response:
        try:
            query = self._parse(request)
            now = time.time_ns()
            end = _parse_ts_ns(request.query.get("end"), now)
            start = _parse_ts_ns(request.query.get("start"), end - 3600 * 10**9)
            limit = int(request.query.get("limit", "100"))
            if isinstance(query, LogQuery):
                backward = request.query.get("direction", "backward") == "backward"
                return _success("streams", self._select(query, start, end, limit, backward))
            step_s = _step(request.query.get("step"), (end - start) / 1e9)
            return _success("matrix", self._matrix(query, start, end, int(step_s * 1e9)))
        except (LogQLError, ValueError) as exc:
            return web.Response(status=400, text=f"{exc}\n")

    async def _query(self, request: web.Request) -> web.Response:
        try:
            query = self._parse(request)
            if isinstance(query, LogQuery):
                raise LogQLError("log queries on /query are not supported by this Loki double; use query_range")
            at = _parse_ts_ns(request.query.get("time"), time.time_ns())
            series = self._evaluate(query, at)
            result = [{"metric": dict(k), "value": [at / 1e9, _fmt(v)]} for k, v in sorted(series.items())]
            return _success("vector", result)
        except (LogQLError, ValueError) as exc:
            return web.Response(status=400, text=f"{exc}\n")

    # -- evaluation ----------------------------------------------------------------------

    def _select(self, query: LogQuery, start: int, end: int, limit: int, backward: bool) -> list[dict[str, Any]]:
        hits = [(ts, key, line) for key, entries in self.streams.items() if query.selects(dict(key))
                for ts, line in entries if start <= ts < end and query.keeps(line)]
        hits.sort(key=lambda h: h[0], reverse=backward)
        grouped: dict[tuple[tuple[str, str], ...], list[list[str]]] = {}
        for ts, key, line in hits[:limit]:
            grouped.setdefault(key, []).append([str(ts), line])
        return [{"stream": dict(k), "values": v} for k, v in grouped.items()]

    def _evaluate(self, query: MetricQuery, at: int) -> dict[tuple[tuple[str, str], ...], float]:
        lo = at - int(query.range_s * 1e9)
        per_stream: dict[tuple[tuple[str, str], ...], float] = {}
        for key, entries in self.streams.items():
            if not query.inner.selects(dict(key)):
                continue
            n = sum(1 for ts, line in entries if lo < ts <= at and query.inner.keeps(line))
            if n:
                per_stream[key] = n / query.range_s if query.fn == "rate" else float(n)
        if query.grouping is None:
            return per_stream
        out: dict[tuple[tuple[str, str], ...], float] = {}
        for key, value in per_stream.items():
            labels = dict(key)
            kept = ({k: v for k, v in labels.items() if k in query.labels} if query.grouping == "by"
                    else {k: v for k, v in labels.items() if k not in query.labels})
            group = tuple(sorted(kept.items()))
            out[group] = out.get(group, 0.0) + value
        return out

    def _matrix(self, query: MetricQuery, start: int, end: int, step: int) -> list[dict[str, Any]]:
        points: dict[tuple[tuple[str, str], ...], list[list[Any]]] = {}
        t = start
        while t <= end:
            for key, value in self._evaluate(query, t).items():
                points.setdefault(key, []).append([t / 1e9, _fmt(value)])
            t += max(step, 1)
        return [{"metric": dict(k), "values": v} for k, v in sorted(points.items())]


def _step(value: str | None, span_s: float) -> float:
    if not value:
        return max(1.0, math.ceil(span_s / 250))
    m = _DUR.fullmatch(value)
    return int(m.group(1)) * _DUR_S[m.group(2)] if m else float(value)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _success(kind: str, result: list[dict[str, Any]]) -> web.Response:
    return web.json_response({"status": "success", "data": {"resultType": kind, "result": result, "stats": {}}})


async def push_logs(loki_url: str, streams: Iterable[tuple[Mapping[str, str], Iterable[tuple[float, str]]]]) -> None:
    """POST lines to ``/loki/api/v1/push`` (JSON): [(labels, [(unix seconds, line), ...]), ...]."""
    body = {"streams": [{"stream": dict(labels), "values": [[str(int(ts * 1e9)), line] for ts, line in lines]}
                        for labels, lines in streams]}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(f"{loki_url}/loki/api/v1/push", json=body) as resp,
    ):
        if resp.status not in (200, 204):
            raise RuntimeError(f"loki push failed: HTTP {resp.status} {await resp.text()}")


# --------------------------------------------------------------------------- #
# induced PostgreSQL states
# --------------------------------------------------------------------------- #


@contextlib.asynccontextmanager
async def stats_reader_role(admin_dsn: str, *, prefix: str = "agentjobs_stats") -> AsyncIterator[tuple[str, str]]:
    """A role with only LOGIN and ``pg_read_all_stats`` (like the agent's Vault user): (user, password)."""
    import psycopg
    from psycopg import sql

    user = f"{prefix}_{secrets.token_hex(4)}"
    password = "pw-" + secrets.token_urlsafe(12)
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pg_read_all_stats").format(
            sql.Identifier(user), sql.Literal(password)))
    try:
        yield user, password
    finally:
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
            await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (user,))
            await conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


async def _activity_count(admin_dsn: str, where: str, params: Sequence[Any]) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}", params)
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def wait_for_activity(admin_dsn: str, where: str, params: Sequence[Any], count: int,
                            *, timeout: float = 10.0) -> None:
    """Await at least ``count`` pg_stat_activity rows matching ``where``."""

    async def probe() -> bool:
        return await _activity_count(admin_dsn, where, params) >= count

    await wait_until(probe, timeout=timeout, what=f"{count} sessions where {where} {list(params)}")


@contextlib.asynccontextmanager
async def idle_in_transaction(dsn: str, count: int, *, application_name: str = "checkout-api",
                              touch_table: str | None = None) -> AsyncIterator[list[int]]:
    """``count`` sessions from ``application_name`` left idle inside an open transaction; their pids."""
    import psycopg

    conns = []
    try:
        for _ in range(count):
            conn = await psycopg.AsyncConnection.connect(dsn, application_name=application_name)
            conns.append(conn)
            await conn.execute("SELECT 1" if touch_table is None else f"SELECT count(*) FROM {touch_table}")
        # psycopg opened a transaction (not autocommit) and the statement finished: idle in transaction
        yield [c.info.backend_pid for c in conns]
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await conn.close()


@dataclass
class BlockingChain:
    holder_pid: int  # holds the row lock in an open transaction (idle in transaction)
    waiter_pids: list[int] = field(default_factory=list)  # blocked on it (and on each other)
    table: str = ""


@contextlib.asynccontextmanager
async def blocking_chain(dsn: str, admin_dsn: str, *, holder_app: str = "orders-batch",
                         waiter_app: str = "checkout-api", waiters: int = 2,
                         timeout: float = 10.0) -> AsyncIterator[BlockingChain]:
    """Session A updates a row and stays idle in transaction; ``waiters`` sessions update the same row and wait."""
    import psycopg

    table = f"chain_{secrets.token_hex(3)}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as setup:
        await setup.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, stock int NOT NULL)")
        await setup.execute(f"INSERT INTO {table} VALUES (1, 10)")
    holder = await psycopg.AsyncConnection.connect(dsn, application_name=holder_app)
    waiting_conns: list[Any] = []
    tasks: list[asyncio.Task[Any]] = []
    try:
        await holder.execute(f"UPDATE {table} SET stock = stock - 1 WHERE id = 1")  # lock held, tx open
        chain = BlockingChain(holder.info.backend_pid, table=table)
        for _ in range(waiters):
            conn = await psycopg.AsyncConnection.connect(dsn, application_name=waiter_app)
            waiting_conns.append(conn)
            chain.waiter_pids.append(conn.info.backend_pid)
            tasks.append(asyncio.create_task(conn.execute(f"UPDATE {table} SET stock = stock - 1 WHERE id = 1")))
        await wait_for_activity(admin_dsn, "pid = ANY(%s) AND wait_event_type = 'Lock'", [chain.waiter_pids],
                                waiters, timeout=timeout)
        yield chain
    finally:
        with contextlib.suppress(Exception):
            await holder.rollback()
            await holder.close()
        # each waiter gets the lock in turn once the one before it ends its transaction
        for task, conn in zip(tasks, waiting_conns, strict=True):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=5)
            with contextlib.suppress(Exception):
                await conn.rollback()
                await conn.close()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as cleanup:
            await cleanup.execute(f"DROP TABLE IF EXISTS {table}")


@contextlib.asynccontextmanager
async def long_running_query(dsn: str, admin_dsn: str, *, seconds: float = 60.0,
                             application_name: str = "report-job") -> AsyncIterator[int]:
    """A session running ``pg_sleep(seconds)``; cancelled on exit. Yields its pid."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(dsn, application_name=application_name, autocommit=True)
    pid = conn.info.backend_pid
    task = asyncio.create_task(conn.execute("SELECT pg_sleep(%s)", (seconds,)))
    try:
        await wait_for_activity(admin_dsn, "pid = %s AND state = 'active'", [pid], 1)
        yield pid
    finally:
        async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
            await admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout=5)
        with contextlib.suppress(Exception):
            await conn.close()
