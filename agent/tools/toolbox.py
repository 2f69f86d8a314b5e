"""The agent's tools by name, and the few helpers every tool shares.

``Toolbox`` is what reasoners hold: it finds a tool by name, counts calls (the
``tool_calls`` cost of a finding), wraps each call in an OpenTelemetry span when
``opentelemetry-api`` is installed, and turns anything a tool failed to catch
into a failed ``Observation`` — a tool bug becomes evidence, never a crash.

The helpers below keep the tools' bounds and failure reports uniform: time
arguments (``now``, ``now-15m``, RFC 3339, unix seconds), bounded body reads,
secret redaction and one-line failure reasons.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp

from schemas import utcnow

from .base import Observation, OperationSpec, Tool, bounded

try:  # tracing is optional: without the API there are simply no spans
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on the environment
    _otel_trace = None

REDACTED = "******"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ParamError(ValueError):
    """A parameter is missing or invalid; the message says which and why."""


class BodyTooLarge(Exception):
    """An answer exceeded ``Limits.max_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer larger than {limit} bytes (max_bytes); narrow the query")


class Toolbox:
    """Tools by name; counts calls; one span per call; never raises from ``run``."""

    def __init__(self, tools: Iterable[Tool], *, tracer: Any = None) -> None:
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self.calls: Counter[str] = Counter()  # "tool.operation" -> calls
        # an OpenTelemetry Tracer; default: the global provider's (a no-op until one is configured)
        if tracer is None and _otel_trace is not None:
            tracer = _otel_trace.get_tracer("agentjobs.agent.tools")
        self._tracer = tracer

    @property
    def tool_calls(self) -> int:
        return sum(self.calls.values())

    def credential_domains(self) -> set[str]:
        """The Vault credential domains the tools need (``None`` ones excluded)."""
        return {t.credential_domain for t in self.tools.values() if t.credential_domain}

    def operations(self) -> dict[str, Mapping[str, OperationSpec]]:
        return {name: tool.operations() for name, tool in self.tools.items()}

    async def run(self, tool: str, operation: str, params: Mapping[str, Any] | None = None) -> Observation:
        """Run ``tool.operation(params)``; an unknown tool or a tool bug is a failed observation."""
        self.calls[f"{tool}.{operation}"] += 1
        found = self.tools.get(tool)
        if found is None:
            return failure(tool, operation, "", f"unknown tool {tool!r}; known: {', '.join(sorted(self.tools))}")
        if self._tracer is None:
            return await self._run(found, operation, params or {})
        with self._tracer.start_as_current_span(f"tool {tool}.{operation}",
                                          attributes={"agentjobs.tool": tool,
                                                      "agentjobs.operation": operation}) as span:
            obs = await self._run(found, operation, params or {})
            span.set_attribute("agentjobs.ok", obs.ok)
            span.set_attribute("agentjobs.truncated", obs.truncated)
            span.set_attribute("agentjobs.query", obs.query[:500])
            if not obs.ok and _otel_trace is not None:
                span.set_status(_otel_trace.Status(_otel_trace.StatusCode.ERROR, obs.excerpt[:200]))
            return obs

    @staticmethod
    async def _run(tool: Tool, operation: str, params: Mapping[str, Any]) -> Observation:
        try:
            return await tool.run(operation, params)
        except Exception as exc:  # a tool bug must not end the investigation
            return failure(tool.name, operation, "", f"tool error: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        for tool in self.tools.values():
            try:
                await tool.close()
            except Exception:  # closing is best effort; nothing to report to
                pass


# --------------------------------------------------------------------------- #
# helpers shared by the tools
# --------------------------------------------------------------------------- #


def failure(tool: str, operation: str, query: str, reason: str, *, secrets: Iterable[str] = ()) -> Observation:
    """A failed call as evidence: the reason, one line, bounded, redacted."""
    text = redact(" ".join(reason.split()), secrets) or "failed (no reason given)"
    return Observation(tool=tool, operation=operation, query=query, ok=False, at=utcnow(), excerpt=bounded(text))


def unknown_operation(tool: str, operation: str, known: Iterable[str]) -> Observation:
    return failure(tool, operation, "", f"unknown operation {operation!r}; known: {', '.join(sorted(known))}")


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every non-trivial secret replaced by ``******``."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def describe_error(exc: BaseException, timeout: float) -> str:
    """A short reason for a failed call (timeouts named as such)."""
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90"``, ``"15m"``, ``"1h30m"``; raises ``ParamError``."""
    if isinstance(value, bool):
        raise ParamError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ParamError(f"invalid duration {value!r} (use seconds or e.g. 30s, 15m, 1h)") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ParamError(f"invalid duration {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``900`` → ``"15m"``: the largest unit that divides evenly (LogQL/PromQL range syntax)."""
    whole = max(1, int(round(seconds)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def parse_time(value: Any, now: float) -> float:
    """Unix seconds from unix seconds, RFC 3339, ``"now"`` or ``"now-15m"``; raises ``ParamError``."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text == "now":
        return now
    if text.startswith("now-"):
        return now - parse_duration(text[4:])
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ParamError(f"invalid time {value!r} (use unix seconds, RFC 3339, 'now' or 'now-15m')") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def require(params: Mapping[str, Any], key: str) -> Any:
    value = params.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ParamError(f"parameter {key!r} is required")
    return value


def int_param(params: Mapping[str, Any], key: str, default: int, *, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ParamError(f"parameter {key!r} must be an integer") from None
    return max(lo, min(hi, number))


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or ``BodyTooLarge`` as soon as more than ``limit`` bytes arrived."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def clock_or_default(now: Callable[[], float] | None) -> Callable[[], float]:
    return now or time.time
