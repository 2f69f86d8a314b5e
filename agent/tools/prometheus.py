"""The ``prometheus`` tool: PromQL over the Prometheus HTTP API, bounded.

Instant and range queries (``/api/v1/query``, ``/api/v1/query_range``) and the
alert's own expression re-run from its ``generatorURL``. The generator URL is
untrusted alert data: only its ``g0.expr`` parameter is read, and it is run
against *this* tool's configured Prometheus — the host in the URL is never
contacted.

Bounds: one ``Limits.timeout`` for the whole call (the server's own evaluation
``timeout`` is set to it too), at most ``max_bytes`` of answer read (a larger
answer is a failed observation asking to narrow the query: a cut JSON body is
useless), at most ``max_rows`` series kept (``truncated`` set).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import aiohttp

from schemas import utcnow

from .base import Observation, OperationSpec, bounded
from .http import HttpTool, number
from .toolbox import (
    BodyTooLarge,
    ParamError,
    describe_error,
    failure,
    format_duration,
    parse_duration,
    parse_time,
    redact,
    require,
    rfc3339,
    unknown_operation,
)

MAX_POINTS = 500  # a range query without a step gets one fitting this many points per series
_TIME = {"type": ["string", "number"],
         "description": "unix seconds, RFC 3339, 'now' or 'now-<duration>' such as 'now-15m'"}

OPERATIONS: dict[str, OperationSpec] = {
    "query": OperationSpec(
        name="query",
        description="Evaluate a PromQL expression at one instant (default: now). Returns the series "
                    "with their labels and value.",
        parameters={"type": "object", "required": ["expr"], "additionalProperties": False,
                    "properties": {"expr": {"type": "string", "description": "PromQL expression"},
                                   "time": _TIME}},
    ),
    "query_range": OperationSpec(
        name="query_range",
        description="Evaluate a PromQL expression over a time range. Returns the series with their "
                    "labels and [time, value] points.",
        parameters={"type": "object", "required": ["expr"], "additionalProperties": False,
                    "properties": {"expr": {"type": "string", "description": "PromQL expression"},
                                   "start": {**_TIME,
                                             "description": "range start (default now-1h); " + _TIME["description"]},
                                   "end": {**_TIME, "description": "range end (default now); " + _TIME["description"]},
                                   "step": {"type": ["string", "number"],
                                            "description": "resolution: seconds or e.g. '30s', '1m' "
                                                           f"(default: at most {MAX_POINTS} points)"}}},
    ),
    "targets": OperationSpec(
        name="targets",
        description="The active scrape targets (/api/v1/targets), optionally only one job's and/or one "
                    "instance's: health (up/down/unknown), lastError, lastScrape, scrapeDuration (seconds), "
                    "scrapeUrl and the target's job and instance labels.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"job": {"type": "string", "description": "the target's job label"},
                                   "instance": {"type": "string",
                                                "description": "the target's instance label, e.g. host:port"}}},
    ),
    "alert_expression": OperationSpec(
        name="alert_expression",
        description="Re-run the alert's own PromQL expression (the g0.expr parameter of its "
                    "generatorURL) as an instant query against this Prometheus.",
        parameters={"type": "object", "required": ["generator_url"], "additionalProperties": False,
                    "properties": {"generator_url": {"type": "string",
                                                     "description": "the alert's generatorURL"},
                                   "time": _TIME}},
    ),
}


def expression_from_generator_url(url: str) -> str:
    """The ``g0.expr`` query parameter of a Prometheus/Alertmanager generatorURL; raises ``ParamError``."""
    query = urlsplit(url.strip()).query
    exprs = parse_qs(query).get("g0.expr") or []
    if not exprs or not exprs[0].strip():
        raise ParamError("generator_url has no g0.expr parameter")
    return exprs[0].strip()


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def scrape_target(raw: Any) -> dict[str, Any]:
    """One entry of ``activeTargets`` reduced to what diagnosis needs (pure)."""
    item = raw if isinstance(raw, Mapping) else {}
    labels = item.get("labels") if isinstance(item.get("labels"), Mapping) else {}
    return {"job": str(labels.get("job", item.get("scrapePool", ""))),
            "instance": str(labels.get("instance", "")),
            "health": str(item.get("health", "unknown")),
            "lastError": bounded(str(item.get("lastError") or ""), 500),
            "lastScrape": str(item.get("lastScrape", "")),
            "scrapeDuration": _finite(number(item.get("lastScrapeDuration"))),  # seconds
            "scrapeUrl": bounded(str(item.get("scrapeUrl", "")), 500)}


def _labels(metric: Mapping[str, str]) -> str:
    name = metric.get("__name__", "")
    rest = ",".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest or not name else name


def _fmt(value: float) -> str:
    return f"{value:.6g}"


class PrometheusTool(HttpTool):
    """PromQL over one Prometheus (``base_url``), optionally with extra headers (e.g. auth)."""

    name: ClassVar[str] = "prometheus"
    OPERATIONS = OPERATIONS

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
        if operation == "targets":
            return await self._targets(params)
        query = ""
        try:
            now = self._now()
            if operation == "query_range":
                query = str(require(params, "expr"))
                end = parse_time(params.get("end") or "now", now)
                start = parse_time(params.get("start") or "now-1h", now)
                if start >= end:
                    raise ParamError("start must be before end")
                step = (parse_duration(params["step"]) if params.get("step")
                        else max(1.0, math.ceil((end - start) / MAX_POINTS)))
                if step <= 0:
                    raise ParamError("step must be positive")
                if (end - start) / step > 11_000:  # Prometheus refuses more points per series
                    raise ParamError(f"too many points: (end-start)/step = {(end - start) / step:.0f} > 11000")
                form = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
                path = "/api/v1/query_range"
                when = f"range {rfc3339(start)} .. {rfc3339(end)} step {format_duration(step)}"
            else:
                if operation == "alert_expression":
                    query = expression_from_generator_url(str(require(params, "generator_url")))
                else:
                    query = str(require(params, "expr"))
                at = parse_time(params["time"], now) if params.get("time") is not None else now
                form = {"query": query, "time": f"{at:.3f}"}
                path = "/api/v1/query"
                when = f"at {rfc3339(at)}"
        except ParamError as exc:
            return failure(self.name, operation, query, f"invalid parameters: {exc}")

        form["timeout"] = f"{max(0.1, self.limits.timeout):g}s"
        try:
            async with asyncio.timeout(self.limits.timeout):
                body = await self._post(path, form)
        except (TimeoutError, BodyTooLarge, aiohttp.ClientError, OSError, ValueError) as exc:
            return failure(self.name, operation, query,
                           f"{self.base_url}{path}: {describe_error(exc, self.limits.timeout)}", secrets=self._secrets)
        status, payload = body
        if not isinstance(payload, dict) or payload.get("status") != "success":
            reason = "unexpected answer"
            if isinstance(payload, dict):
                reason = f"{payload.get('errorType', 'error')}: {payload.get('error', '')}"
            return failure(self.name, operation, query, f"HTTP {status} {reason}", secrets=self._secrets)
        when += "".join(f"; warning: {w}" for w in payload.get("warnings") or [])
        return self._observation(operation, query, when, payload.get("data") or {})

    async def _targets(self, params: Mapping[str, Any]) -> Observation:
        """The active targets, filtered by ``job``/``instance`` (exact label values), at most ``max_rows``."""
        wanted = {k: str(params[k]) for k in ("job", "instance") if params.get(k) not in (None, "")}
        unknown = sorted(set(params) - {"job", "instance"})
        query = "/api/v1/targets?state=active" + "".join(f" {k}={v!r}" for k, v in sorted(wanted.items()))
        if unknown:
            return failure(self.name, "targets", query, f"invalid parameters: unknown {', '.join(unknown)}")
        request = {"state": "active", **({"scrapePool": wanted["job"]} if "job" in wanted else {})}
        try:
            async with asyncio.timeout(self.limits.timeout):
                status, raw = await self._fetch("GET", "/api/v1/targets", params=request)
            payload = json.loads(raw)
        except (TimeoutError, BodyTooLarge, aiohttp.ClientError, OSError, ValueError) as exc:
            return failure(self.name, "targets", query,
                           f"{self.base_url}/api/v1/targets: {describe_error(exc, self.limits.timeout)}",
                           secrets=self._secrets)
        if not isinstance(payload, dict) or payload.get("status") != "success":
            reason = (f"{payload.get('errorType', 'error')}: {payload.get('error', '')}"
                      if isinstance(payload, dict) else "unexpected answer")
            return failure(self.name, "targets", query, f"HTTP {status} {reason}", secrets=self._secrets)
        found = [t for t in map(scrape_target, (payload.get("data") or {}).get("activeTargets") or [])
                 if all(t[k] == v for k, v in wanted.items())]
        truncated = len(found) > self.limits.max_rows
        kept = found[: self.limits.max_rows]
        lines = [f"{len(found)} active target(s)" + (f", first {len(kept)} kept" if truncated else "")]
        for t in kept:
            took = _fmt(t["scrapeDuration"]) if t["scrapeDuration"] is not None else "?"
            line = (f"job={t['job']} instance={t['instance']} health={t['health']} "
                    f"scrapeDuration={took}s lastScrape={t['lastScrape']}")
            lines.append(line + (f" lastError={t['lastError']}" if t["lastError"] else ""))
        return Observation(tool=self.name, operation="targets", query=query, ok=True, at=utcnow(), data=kept,
                           excerpt=bounded(redact("\n".join(lines), self._secrets)), truncated=truncated)

    async def _post(self, path: str, form: dict[str, str]) -> tuple[int, Any]:
        # form-encoded POST: long expressions do not hit URL length limits
        status, raw = await self._fetch("POST", path, data=form)
        try:
            return status, json.loads(raw)
        except ValueError:
            snippet = raw[:200].decode("utf-8", "replace")
            raise ValueError(f"HTTP {status}, not JSON: {snippet}") from None

    def _observation(self, operation: str, query: str, when: str, data: Mapping[str, Any]) -> Observation:
        kind = data.get("resultType")
        result = data.get("result")
        series: list[dict[str, Any]] = []
        if kind in ("scalar", "string"):
            at, value = result if isinstance(result, list) and len(result) == 2 else (None, None)
            series.append({"metric": {}, "value": number(value) if kind == "scalar" else value, "at": at})
        else:
            for item in result or []:
                entry: dict[str, Any] = {"metric": dict(item.get("metric") or {})}
                if "values" in item:
                    entry["values"] = [[float(t), number(v)] for t, v in item["values"]]
                else:
                    at, value = item.get("value") or (None, None)
                    entry["value"], entry["at"] = number(value), at
                series.append(entry)
        truncated = len(series) > self.limits.max_rows
        kept = series[: self.limits.max_rows]
        lines = [f"{len(series)} series ({kind}, {when})" + (f", first {len(kept)} kept" if truncated else "")]
        for s in kept:
            if "values" in s:
                vals = [v for _, v in s["values"] if not math.isnan(v)]
                stats = (f"last={_fmt(vals[-1])} min={_fmt(min(vals))} max={_fmt(max(vals))}" if vals else "no values")
                lines.append(f"{_labels(s['metric'])}: {len(s['values'])} points, {stats}")
            else:
                value = s["value"]
                lines.append(f"{_labels(s['metric'])} = {_fmt(value) if isinstance(value, float) else value}")
        excerpt = redact("\n".join(lines), self._secrets)
        return Observation(tool=self.name, operation=operation, query=query, ok=True, at=utcnow(), data=kept,
                           excerpt=bounded(excerpt), truncated=truncated)
