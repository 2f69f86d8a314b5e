"""The ``http`` tool: one bounded GET of a service endpoint, as evidence about that endpoint.

Alerts such as ``up == 0``, ``probe_success == 0``, a 5xx rate or a latency SLO
are about an endpoint; the first question an SRE asks is what it answers *now*:
nothing (refused, no DNS name, TLS failure, reset, timeout), a status code,
how fast, and the first bytes of the body.

The agent must not become a way to reach anything from inside the cluster
(SSRF): it may only GET URLs under the prefixes the operator configured
(``AGENTJOBS_TOOLS__HTTP_TARGETS``). The check is structural, not a string
prefix: scheme, host and port must be equal, the path must lie under the
prefix's path on a segment boundary, and URLs carrying credentials, dot
segments or encoded dots and slashes are refused. Redirects are followed only
to URLs that pass the same check, at most ``MAX_REDIRECTS`` of them.

Which outcome is which:

* an endpoint that refuses, times out or fails TLS is an *observation* of that
  endpoint (``ok=True`` with ``error_kind``): the tool worked and saw the fault;
* a URL outside the allowed targets, or invalid parameters, is a failed call
  (``ok=False``): nothing was observed.

No response header is ever echoed (they may carry cookies or tokens), no
request header beyond the user agent is sent, and the body is read at most to
``Limits.max_bytes`` with only ``BODY_EXCERPT_BYTES`` kept.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import aiohttp

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .toolbox import ParamError, failure, require, unknown_operation

MAX_REDIRECTS = 3  # redirects followed (each one checked against the allowed targets)
BODY_EXCERPT_BYTES = 512  # bytes of the body kept in the observation
USER_AGENT = "agentjobs-agent http probe"
ERROR_KINDS = ("refused", "timeout", "dns", "tls", "reset", "protocol", "")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL = re.compile(r"[\x00-\x1f\x7f\s]")
_BODY_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]+")

OPERATIONS: dict[str, OperationSpec] = {
    "probe": OperationSpec(
        name="probe",
        description="GET one URL (only under the configured HTTP targets) and report what the endpoint "
                    "answers: status code and reason, latency in seconds, a short body excerpt, or why it "
                    "could not be reached (error_kind refused, timeout, dns, tls, reset, protocol).",
        parameters={"type": "object", "required": ["url"], "additionalProperties": False,
                    "properties": {"url": {"type": "string",
                                           "description": "absolute http(s) URL under one of the allowed "
                                                          "targets"}}},
    ),
}


class TargetError(ValueError):
    """A URL or prefix that cannot be probed; the message says why."""


@dataclass(frozen=True)
class Target:
    """One allowed URL prefix, split into the parts that must match."""

    scheme: str
    host: str
    port: int
    path: str  # ends with "/" unless the prefix names one exact path

    def covers(self, url: SplitResult) -> bool:
        """Whether ``url`` (already checked by ``parse_url``) lies under this prefix (pure)."""
        if (url.scheme, (url.hostname or ""), _port(url)) != (self.scheme, self.host, self.port):
            return False
        path = url.path or "/"
        if self.path.endswith("/"):
            return path.startswith(self.path)
        return path == self.path or path.startswith(self.path + "/")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def _port(url: SplitResult) -> int:
    try:
        port = url.port
    except ValueError:
        raise TargetError("invalid port") from None
    return port if port is not None else _DEFAULT_PORTS[url.scheme]


def parse_url(text: str) -> SplitResult:
    """``text`` split, if it is an absolute http(s) URL the probe could GET; raises ``TargetError`` (pure)."""
    if not isinstance(text, str) or not text or _CONTROL.search(text):
        raise TargetError("not a URL (empty, or contains whitespace or control characters)")
    url = urlsplit(text)
    if url.scheme not in _DEFAULT_PORTS:
        raise TargetError("only absolute http:// and https:// URLs can be probed")
    if not url.hostname:
        raise TargetError("the URL names no host")
    if url.username is not None or url.password is not None or "@" in url.netloc:
        raise TargetError("URLs with credentials are never probed")
    _port(url)
    lowered = url.path.lower()
    if "%2e" in lowered or "%2f" in lowered or "%5c" in lowered or "\\" in url.path:
        raise TargetError("encoded dots, slashes or backslashes in the path are not allowed")
    if any(seg in (".", "..") for seg in url.path.split("/")):
        raise TargetError("dot segments (. or ..) in the path are not allowed")
    return url


def parse_target(prefix: str) -> Target:
    """An allowed prefix such as ``http://checkout.shop:8080/`` as a ``Target``; raises ``TargetError`` (pure)."""
    url = parse_url(prefix)
    if url.query or url.fragment:
        raise TargetError(f"a target prefix has no query or fragment: {prefix!r}")
    return Target(scheme=url.scheme, host=(url.hostname or "").lower(), port=_port(url), path=url.path or "/")


def shown(text: str) -> str:
    """A URL as it may appear in evidence: any userinfo removed, bounded (pure)."""
    try:
        url = urlsplit(str(text))
        if "@" in url.netloc:
            url = url._replace(netloc=url.netloc.rsplit("@", 1)[1])
        return bounded(_CONTROL.sub("", urlunsplit(url)), 300)
    except ValueError:
        return bounded(_CONTROL.sub("", str(text)), 300)


class Targets:
    """The allowed prefixes; ``check`` says whether (and why not) a URL may be probed."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.targets = tuple(parse_target(p) for p in prefixes)

    def check(self, text: str) -> SplitResult:
        """``text`` split, if it lies under an allowed prefix; raises ``TargetError`` (pure)."""
        url = parse_url(text)
        url = url._replace(netloc=url.netloc.lower())
        if not any(t.covers(url) for t in self.targets):
            allowed = ", ".join(str(t) for t in self.targets[:10]) or "none configured"
            raise TargetError(f"{shown(text)} is outside the allowed HTTP targets "
                              f"(AGENTJOBS_TOOLS__HTTP_TARGETS: {allowed})")
        return url

    def allows(self, text: str) -> bool:
        try:
            self.check(text)
        except TargetError:
            return False
        return True


def error_kind(exc: BaseException) -> str:
    """Which way reaching the endpoint failed, from the client's exception (pure)."""
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns"
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError | ssl.SSLError):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, ConnectionRefusedError):
            return "refused"
        if isinstance(cause, TimeoutError):
            return "timeout"
        if isinstance(cause, ConnectionResetError):
            return "reset"
        return "refused"  # no listener reachable (no route, host down): the connection was never made
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError
                  | ConnectionResetError | aiohttp.ClientPayloadError):
        return "reset"
    return "protocol"


_DESCRIBED = {"refused": "connection refused: nothing accepts connections there",
              "timeout": "no answer within the timeout",
              "dns": "the host name does not resolve",
              "tls": "the TLS handshake failed",
              "reset": "the connection was closed or reset before a complete answer",
              "protocol": "the answer was not valid HTTP"}


def excerpt_of(body: bytes) -> str:
    """The first ``BODY_EXCERPT_BYTES`` of a body as one safe line of text (pure)."""
    text = body[:BODY_EXCERPT_BYTES].decode("utf-8", "ignore")
    return _BODY_CONTROL.sub(" ", text).strip()


class ProbeTool:
    """GETs URLs under the allowed ``targets`` (URL prefixes), bounded by ``limits``."""

    name: ClassVar[str] = "http"
    credential_domain: ClassVar[str | None] = None

    def __init__(self, targets: Sequence[str], *, limits: Limits | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.targets = Targets(targets)  # raises TargetError for a prefix that cannot be a target
        self.limits = limits or Limits()
        self._clock = clock or time.monotonic
        self._session: aiohttp.ClientSession | None = None

    def operations(self) -> Mapping[str, OperationSpec]:
        return OPERATIONS

    def allows(self, url: str) -> bool:
        """Whether ``url`` may be probed (the sweep tries only such candidates)."""
        return self.targets.allows(url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
        raw = params.get("url")
        query = f"GET {shown(raw)}" if isinstance(raw, str) else "GET"
        try:
            unknown = sorted(set(params) - {"url"})
            if unknown:
                raise ParamError(f"unknown parameter(s): {', '.join(unknown)}")
            url = str(require(params, "url"))
            self.targets.check(url)
        except (ParamError, TargetError) as exc:
            return failure(self.name, operation, query, f"not probed: {exc}")
        return await self._probe(url, query)

    async def _probe(self, url: str, query: str) -> Observation:
        if self._session is None:
            # A fresh connection per request (no pooled keep-alive hiding a dead listener), no proxy
            # from the environment, no cookies kept between probes.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": USER_AGENT})
        started = self._clock()
        status: int | None = None
        reason, kind, body, truncated, note, detail = "", "", b"", False, "", ""
        current = url
        try:
            async with asyncio.timeout(self.limits.timeout):
                for hop in range(MAX_REDIRECTS + 1):
                    status, reason, body, truncated, location = await self._get(current)
                    if location is None:
                        break
                    if hop == MAX_REDIRECTS:
                        note = f"more than {MAX_REDIRECTS} redirects: the last one was not followed"
                        break
                    nxt = urljoin(current, location)
                    if not self.targets.allows(nxt):
                        note = "redirects outside the allowed HTTP targets: not followed"
                        break
                    current = nxt
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError, ValueError) as exc:
            kind = error_kind(exc)
            status, reason, body, truncated = None, _DESCRIBED[kind], b"", False
            detail = "" if isinstance(exc, TimeoutError) else bounded(" ".join(str(exc).split()), 200)
        latency = round(max(0.0, self._clock() - started), 6)
        data = {"url": shown(current), "status": status, "reason": reason, "latency_s": latency,
                "error_kind": kind, "body_excerpt": excerpt_of(body)}
        if current != url:
            data["requested_url"] = shown(url)
        if note:
            data["note"] = note
        if detail:
            data["detail"] = detail
        if kind:
            line = f"{query}: {kind} ({reason}) after {latency:.3f} s" + (f"; {detail}" if detail else "")
        else:
            line = f"{query}: {status} {reason} in {latency:.3f} s"
            if current != url:
                line += f" (at {shown(current)}, after redirects)"
            if note:
                line += f"; {note}"
            if data["body_excerpt"]:
                line += f"; body: {data['body_excerpt'][:300]}"
        return Observation(tool=self.name, operation="probe", query=query, ok=True, at=utcnow(), data=data,
                           excerpt=bounded(line), truncated=truncated)

    async def _get(self, url: str) -> tuple[int, str, bytes, bool, str | None]:
        """(status, reason, body read, cut short, redirect location or None) of one GET."""
        assert self._session is not None
        async with self._session.get(url, allow_redirects=False) as resp:
            body, truncated = await _read_bounded(resp, self.limits.max_bytes)
            location = resp.headers.get("Location") if resp.status in (301, 302, 303, 307, 308) else None
            reason = bounded(_BODY_CONTROL.sub(" ", resp.reason or "").strip(), 100)  # the server's words
            return resp.status, reason, body, truncated, location


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body (only the excerpt is kept), and whether there was more."""
    kept = bytearray()
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if len(kept) < BODY_EXCERPT_BYTES:
            kept += chunk[: BODY_EXCERPT_BYTES - len(kept)]
        if size > limit:
            return bytes(kept), True
    return bytes(kept), False
