"""The ``logs`` tool: LogQL over Loki's HTTP API around the incident window, bounded.

``query_range`` returns log lines (newest first by default) or, for a metric
LogQL query, series. ``error_counts`` answers "how many error lines, by what,
and show me a few": it counts with LogQL itself — an instant
``sum by (<labels>) (count_over_time({selector} |~ `<pattern>` [<window>]))``
at the window's end, exact however many lines there are — beside the count of
all lines in the window (so a reasoner can tell a rate from a flood), plus the
newest few matching lines as samples.

Bounds: ``Limits.timeout`` for the whole call, ``max_bytes`` of answer read
(more is a failed observation asking to narrow the query), at most
``max_rows`` lines or series kept (Loki's own ``limit`` is set to it), each
line cut to ``LINE_CHARS``. Selectors and patterns are checked before they are
put into LogQL.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .http import HttpTool, number
from .toolbox import (
    BodyTooLarge,
    ParamError,
    describe_error,
    failure,
    format_duration,
    int_param,
    parse_duration,
    parse_time,
    redact,
    require,
    rfc3339,
    unknown_operation,
)

LINE_CHARS = 500  # characters of each log line kept
ERROR_PATTERN = r"(?i)(error|exception|fatal|panic|traceback)"
_SELECTOR = re.compile(r"^\{\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*\"(?:[^\"\\]|\\.)*\""
                       r"(\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*(=|!=|=~|!~)\s*\"(?:[^\"\\]|\\.)*\")*\s*\}$")
_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = {"type": ["string", "number"],
         "description": "unix seconds, RFC 3339, 'now' or 'now-<duration>' such as 'now-15m'"}

OPERATIONS: dict[str, OperationSpec] = {
    "query_range": OperationSpec(
        name="query_range",
        description="Run a LogQL query over a time range. A log query returns lines with timestamp and "
                    "stream labels (newest first by default); a metric query returns series.",
        parameters={"type": "object", "required": ["query"], "additionalProperties": False,
                    "properties": {"query": {"type": "string",
                                             "description": 'LogQL, e.g. {app="checkout"} |= "error"'},
                                   "start": {**_TIME, "description": "default now-1h; " + _TIME["description"]},
                                   "end": {**_TIME, "description": "default now; " + _TIME["description"]},
                                   "limit": {"type": "integer", "minimum": 1, "description": "max lines"},
                                   "direction": {"type": "string", "enum": ["backward", "forward"]}}},
    ),
    "error_counts": OperationSpec(
        name="error_counts",
        description="Count log lines matching an error pattern in a window (optionally by stream labels), "
                    "next to the count of all lines, with the newest matching lines as samples.",
        parameters={"type": "object", "required": ["selector"], "additionalProperties": False,
                    "properties": {"selector": {"type": "string",
                                                "description": 'stream selector, e.g. {app="checkout"}'},
                                   "window": {"type": ["string", "number"], "description": "e.g. 15m (default)"},
                                   "end": {**_TIME, "description": "window end (default now)"},
                                   "pattern": {"type": "string", "description": f"RE2 regex (default {ERROR_PATTERN})"},
                                   "by": {"type": "array", "items": {"type": "string"},
                                          "description": "stream labels to count by, e.g. [\"pod\"]"},
                                   "samples": {"type": "integer", "minimum": 0,
                                               "description": "sample lines (default 5)"}}},
    ),
}


class LokiError(Exception):
    """Loki answered with an error (its message, usually a LogQL parse error)."""


def _ns(ts: float) -> str:
    return str(int(round(ts * 1e9)))


def _ts_from_ns(value: Any) -> str:
    ns = int(value)
    seconds, rest = divmod(ns, 1_000_000_000)
    return rfc3339(seconds).replace("Z", f".{rest:09d}Z") if rest else rfc3339(seconds)


def _labels(metric: Mapping[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"


class LogsTool(HttpTool):
    """LogQL against one Loki (``base_url``); ``tenant`` sets ``X-Scope-OrgID`` for multi-tenant Lokis."""

    name: ClassVar[str] = "logs"
    OPERATIONS = OPERATIONS

    def __init__(self, base_url: str, *, limits: Limits | None = None, tenant: str | None = None,
                 headers: Mapping[str, str] | None = None, now: Callable[[], float] | None = None) -> None:
        super().__init__(base_url, limits=limits, headers=headers, now=now)
        if tenant:
            self._headers["X-Scope-OrgID"] = tenant

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
        query = str(params.get("query") or params.get("selector") or "")
        try:
            async with asyncio.timeout(self.limits.timeout):
                if operation == "query_range":
                    query, data, excerpt, truncated = await self._query_range(params)
                else:
                    query, data, excerpt, truncated = await self._error_counts(params)
        except ParamError as exc:
            return failure(self.name, operation, query, f"invalid parameters: {exc}")
        except (TimeoutError, LokiError, BodyTooLarge, aiohttp.ClientError, OSError, ValueError) as exc:
            return failure(self.name, operation, query, f"{self.base_url}: {describe_error(exc, self.limits.timeout)}",
                           secrets=self._secrets)
        return Observation(tool=self.name, operation=operation, query=query, ok=True, at=utcnow(), data=data,
                           excerpt=bounded(redact(excerpt, self._secrets)), truncated=truncated)

    # -- HTTP ------------------------------------------------------------------------------

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        status, raw = await self._fetch("GET", path, params=params)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            # Loki answers errors as plain text (e.g. "parse error at line 1, col 3: ...")
            text = body.get("error", "") if isinstance(body, dict) else raw[:500].decode("utf-8", "replace")
            raise LokiError(f"HTTP {status}: {text.strip()}")
        return body.get("data") or {}

    # -- operations ------------------------------------------------------------------------

    async def _query_range(self, params: Mapping[str, Any]) -> tuple[str, Any, str, bool]:
        query = str(require(params, "query")).strip()
        now = self._now()
        end = parse_time(params.get("end") or "now", now)
        start = parse_time(params.get("start") or "now-1h", now)
        if start >= end:
            raise ParamError("start must be before end")
        limit = int_param(params, "limit", self.limits.max_rows, lo=1, hi=self.limits.max_rows)
        direction = str(params.get("direction") or "backward")
        if direction not in ("backward", "forward"):
            raise ParamError("direction must be 'backward' or 'forward'")
        step = max(1.0, math.ceil((end - start) / 250))
        data = await self._get("/loki/api/v1/query_range", {
            "query": query, "start": _ns(start), "end": _ns(end), "limit": str(limit), "direction": direction,
            "step": f"{step:g}s"})
        window = f"{rfc3339(start)} .. {rfc3339(end)}"
        if data.get("resultType") == "streams":
            lines = self._lines(data.get("result") or [], direction)
            kept = lines[:limit]
            excerpt = [f"{len(kept)} lines ({direction}, {window})"
                       + (" - limit reached" if len(lines) >= limit else "")]
            excerpt += [f"{ln['ts']} {_labels(ln['labels'])} {ln['line']}" for ln in kept[:50]]
            return query, kept, "\n".join(excerpt), len(lines) >= limit
        series = [{"metric": dict(s.get("metric") or {}),
                   "values": [[float(t), number(v)] for t, v in s.get("values") or []]}
                  for s in data.get("result") or []]
        kept = series[: self.limits.max_rows]
        excerpt = [f"{len(series)} series ({data.get('resultType')}, {window})"]
        for s in kept[:50]:
            values = [v for _, v in s["values"] if not math.isnan(v)]
            excerpt.append(f"{_labels(s['metric'])}: {len(s['values'])} points"
                           + (f", last={values[-1]:g} max={max(values):g}" if values else ""))
        return query, kept, "\n".join(excerpt), len(series) > len(kept)

    async def _error_counts(self, params: Mapping[str, Any]) -> tuple[str, Any, str, bool]:
        selector = str(require(params, "selector")).strip()
        if not _SELECTOR.match(selector):
            raise ParamError('selector must be a LogQL stream selector such as {app="checkout", namespace="shop"}')
        pattern = str(params.get("pattern") or ERROR_PATTERN)
        if "`" in pattern:
            raise ParamError("pattern must not contain a backtick")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ParamError(f"pattern is not a valid regular expression: {exc}") from None
        by = [str(b) for b in params.get("by") or []]
        if any(not _LABEL.match(b) for b in by):
            raise ParamError("by must list label names")
        window = parse_duration(params.get("window") or "15m")
        if window < 1:
            raise ParamError("window must be at least 1s")
        samples = int_param(params, "samples", 5, lo=0, hi=self.limits.max_rows)
        end = parse_time(params.get("end") or "now", self._now())
        rng = format_duration(window)
        matching = f"{selector} |~ `{pattern}`"
        grouping = f"sum by ({', '.join(by)})" if by else "sum"
        count_q = f"{grouping} (count_over_time({matching} [{rng}]))"
        all_q = f"sum (count_over_time({selector} [{rng}]))"
        at = {"time": _ns(end), "limit": str(self.limits.max_rows)}
        jobs = [self._get("/loki/api/v1/query", {"query": count_q, **at}),
                self._get("/loki/api/v1/query", {"query": all_q, **at})]
        if samples:
            jobs.append(self._get("/loki/api/v1/query_range", {
                "query": matching, "start": _ns(end - window), "end": _ns(end), "limit": str(samples),
                "direction": "backward"}))
        answers = await asyncio.gather(*jobs)
        groups = [{"labels": dict(s.get("metric") or {}), "count": int(number((s.get("value") or [0, 0])[1]))}
                  for s in answers[0].get("result") or []]
        groups.sort(key=lambda g: -g["count"])
        total = sum(g["count"] for g in groups)
        lines_total = sum(int(number((s.get("value") or [0, 0])[1])) for s in answers[1].get("result") or [])
        sample_lines = self._lines(answers[2].get("result") or [], "backward")[:samples] if samples else []
        kept = groups[: self.limits.max_rows]
        data = {"selector": selector, "pattern": pattern, "window_s": window, "end": rfc3339(end),
                "total": total, "lines_total": lines_total, "by": kept, "samples": sample_lines}
        share = f" ({total / lines_total:.0%} of {lines_total} lines)" if lines_total else f" (of {lines_total} lines)"
        excerpt = [f"{total} lines matching {pattern} in the {rng} before {rfc3339(end)}{share}"]
        if by:
            excerpt.append("by " + ", ".join(by) + ": "
                           + "; ".join(f"{_labels(g['labels'])} {g['count']}" for g in kept[:20]))
        excerpt += [f"{ln['ts']} {_labels(ln['labels'])} {ln['line']}" for ln in sample_lines]
        return count_q, data, "\n".join(excerpt), len(groups) > len(kept)

    @staticmethod
    def _lines(streams: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
        out = []
        for stream in streams:
            labels = dict(stream.get("stream") or {})
            for ts, line in stream.get("values") or []:
                out.append({"ts_ns": int(ts), "ts": _ts_from_ns(ts), "labels": labels,
                            "line": line if len(line) <= LINE_CHARS else line[: LINE_CHARS - 1] + "…"})
        out.sort(key=lambda ln: ln["ts_ns"], reverse=direction == "backward")
        return out
