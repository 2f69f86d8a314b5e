"""The Alertmanager webhook bridge: HTTP in, confirmed AMQP out.

Prometheus Alertmanager can only call webhooks, so ``agentjobs bridge``
receives ``POST /alerts`` (webhook v4; CloudEvents and our ``IncidentEvent``
are accepted too, because ``decode_incident`` accepts them), validates the
body and publishes the *original bytes* to ``agentjobs.incidents`` with a
publisher confirm. It answers 200 only after the broker confirmed; anything
short of a confirm is a 503, so Alertmanager retries and nothing is lost.
Both are counted (``agentjobs_bridge_forwarded_total``,
``agentjobs_bridge_unavailable_total{reason}``), and
``agentjobs_bridge_broker_connected`` says whether a 503 is what comes next.

Alertmanager retries only 5xx and connection errors: a 4xx (401, 400, 413…)
drops that notification on its side after one attempt. So every 4xx the app
answers ends in one middleware (``_observe``), which logs it at warning
with the peer address and a stable reason and counts it in
``agentjobs_bridge_refused_total{reason}`` (served on this port's ``/metrics``).
The Authorization header and the body are never logged.

Order of checks, cheapest first: auth (401) → size (413, never reading more
than the limit) → decode (400) → broker (503) → 200.

Slow and greedy clients (``_Connection``, wrapped around each of aiohttp's
connections): a request's line and headers must arrive within
``bridge.header_timeout`` of the connection (or of the previous answer), its
body within ``bridge.body_timeout`` (408); at most ``bridge.max_connections``
are open, more are answered 503 and closed at once. Those closed before a
request reached the app are logged (``connection_refused``) and counted in
``agentjobs_bridge_connections_refused_total{reason}``.

The bridge never listens beyond loopback without credentials
(``listen_refusal``), and never declares topology: it connects as its own
broker user, which may only publish ``alertmanager.*`` to ``agentjobs.incidents``,
and checks at start (passively) that the exchange is there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import math
import re
import time
from typing import Any, cast

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import DecodeError, decode_incident
from schemas.errors import TemporaryError
from schemas.incident import IncidentEvent

from dispatcher.plumbing.amqp import Publisher, broker_user, connect
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import BridgeMetrics
from dispatcher.plumbing.settings import BridgeSettings, Settings
from schemas.routing import INCIDENTS

log = get_logger(__name__)

REALM = "agentjobs"
_READ_CHUNK = 64 * 1024  # bytes per read from the request stream
_UNSAFE = re.compile(r"[^a-z0-9_-]+")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_PEER_FIELD_MAX = 200  # characters kept of a client-sent path or X-Forwarded-For
# Reasons for the 4xx aiohttp answers itself (routing, its client_max_size backstop).
_AIOHTTP_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
_LINGER = 2.0  # seconds aiohttp may drain a body we did not read, before it closes instead
_BUSY_BODY = (b'{"error": "too_many_connections", '
              b'"message": "the bridge has too many open connections; retry later"}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (also as ``[::1]`` or IPv4-mapped) and ``localhost``.

    Everything else is not: ``""``, ``0.0.0.0`` and ``::`` mean every address, and a host name
    may resolve to anything.
    """
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def has_credentials(bridge: BridgeSettings) -> bool:
    """A non-blank bearer token, or a basic-auth user *and* password (empty means none, never "off")."""
    return bool(bridge.bearer_token.strip()) or bool(bridge.basic_username and bridge.basic_password)


def listen_refusal(host: str, port: int, bridge: BridgeSettings) -> str | None:
    """Why the bridge must not listen on ``host:port`` as configured, or None (pure).

    Beyond loopback anyone who can reach the port could choose a trust scope, cancel running
    investigations or have PromQL re-run: that needs credentials.
    """
    if is_loopback(host) or has_credentials(bridge):
        return None
    shown = f"[{host}]" if ":" in host else (host or "*")
    return (f"refusing to listen on {shown}:{port} without bridge.bearer_token "
            "(set AGENTJOBS_BRIDGE__BEARER_TOKEN, or bind 127.0.0.1)")


class StartRefused(Exception):
    """The bridge will not start as configured (exit 2): unsafe to listen, or nowhere to publish."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def routing_key(event: IncidentEvent) -> str:
    """``alertmanager.<receiver>`` (one topic word, [a-z0-9_-]); ``alertmanager.default`` without one."""
    word = _UNSAFE.sub("_", event.receiver.lower()).strip("_")[:200] or "default"
    return f"alertmanager.{word}"


def _client_text(value: str) -> str:
    """A client-supplied string fit for one log line: printable ASCII, capped (never trusted)."""
    return _UNPRINTABLE.sub("?", value[:_PEER_FIELD_MAX])


def _auth_scheme(header: str | None) -> str:
    """The kind of credentials a request carried (none, bearer, basic, other), never their value."""
    scheme = (header or "").strip().partition(" ")[0].lower()
    if not scheme:
        return "none"
    return scheme if scheme in ("bearer", "basic") else "other"


class _Refused(Exception):
    """A 4xx the handler decided on; ``_observe`` logs and counts it, then answers ``response``."""

    def __init__(self, response: web.Response, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason  # stable snake_case code: the metric label and the answer's "error"
        self.fields = fields  # extra log fields: never the body, never a credential


def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status, headers=headers)


class _Auth:
    """Bearer and/or basic credentials as Alertmanager's ``http_config`` sends them."""

    def __init__(self, bridge: BridgeSettings) -> None:
        self._bearer = bridge.bearer_token.encode() if bridge.bearer_token else None
        self._basic = (
            f"{bridge.basic_username}:{bridge.basic_password}".encode() if bridge.basic_username else None
        )

    @property
    def required(self) -> bool:
        return self._bearer is not None or self._basic is not None

    def challenge(self) -> list[str]:
        out = []
        if self._bearer is not None:
            out.append(f'Bearer realm="{REALM}"')
        if self._basic is not None:
            out.append(f'Basic realm="{REALM}", charset="UTF-8"')
        return out

    def check(self, header: str | None) -> bool:
        """True when the Authorization header matches a configured credential (constant time)."""
        if not self.required:
            return True
        scheme, _, value = (header or "").strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if scheme == "bearer" and self._bearer is not None:
            return hmac.compare_digest(value.encode(), self._bearer)
        if scheme == "basic" and self._basic is not None:
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(given, self._basic)
        return False


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the bridge's pacing and cap around it.

    Only the asyncio protocol interface is used, so aiohttp's internals stay its own. The
    header timer runs from the connection (then from each answer) until the app sees the next
    request (``_pace``); the body timeout is the handler's (``_read_limited``). When it
    expires, a connection that never brought a request, or sent bytes since the last answer,
    is a slow client (logged, counted); one that only sat idle after an answer is closed
    quietly — so is one whose partial next request came before that answer (pipelined): it
    is closed all the same, only not counted.
    """

    def __init__(self, service: BridgeService) -> None:
        self._service = service
        self._loop = asyncio.get_running_loop()
        self._inner: asyncio.Protocol | None = None  # aiohttp's RequestHandler, once admitted
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._heard = 0  # bytes received since the timer was armed
        self._strict = True  # False after an answer whose body aiohttp may still drain
        self._requests = 0
        self.log = log

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.log = log.bind(remote=peer[0] if isinstance(peer, tuple) and peer else None)
        self._inner = self._service._admit(self)
        if self._inner is None:
            transport.write(_BUSY)
            transport.close()
            return
        self._inner.connection_made(transport)
        self._arm(strict=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        if self._inner is not None:
            self._service._release(self._inner)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # refused: closing
        if self._timer is not None:
            self._heard += len(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    # ---- the header timer

    def request_started(self) -> None:
        self._requests += 1
        self._disarm()

    def request_finished(self, *, drained: bool) -> None:
        """After an answer: the next request's headers are due. ``drained``: the body was all
        received (else aiohttp may still be reading it, and bytes heard are no evidence)."""
        if self._transport is not None and not self._transport.is_closing():
            self._arm(strict=drained)

    def close(self) -> None:
        self._disarm()
        if self._transport is not None:
            self._transport.close()

    def _arm(self, *, strict: bool) -> None:
        self._disarm()
        self._heard, self._strict = 0, strict
        self._armed_at = self._loop.time()
        self._timer = self._loop.call_later(self._service.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._requests == 0 or (self._strict and self._heard):
            # No request yet, or part of the next one: a slow (or stuck) client, not an idle one.
            self._service._connection_refused(self.log, "header_timeout", bytes=self._heard,
                                              requests=self._requests,
                                              waited_ms=round((self._loop.time() - self._armed_at) * 1000, 1))
            transport.abort()  # it may not read either: do not wait for a flush
        else:
            transport.close()  # an idle kept-alive connection: closed quietly


class _Site(web.BaseSite):
    """aiohttp's ``TCPSite``, with each accepted connection wrapped in ``_Connection``."""

    def __init__(self, runner: web.AppRunner, service: BridgeService, host: str, port: int) -> None:
        super().__init__(runner, backlog=max(128, min(service.max_connections, 4096)))
        self._service, self._host, self._port = service, host, port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def bound_port(self) -> int:
        sockets = getattr(self._server, "sockets", None) or []
        return sockets[0].getsockname()[1] if sockets else self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self._service), self._host or None,
                                                self._port, backlog=self._backlog)


class BridgeService:
    """The bridge's HTTP server and broker connection; ``start()`` returns the bound port."""

    name = "agentjobs-bridge"

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None,
                 metrics: BridgeMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or BridgeMetrics()
        self.metrics.broker_connected.set_function(lambda: 1.0 if self.ready else 0.0)  # read at scrape time
        self.host = settings.bridge.host if host is None else host
        self.port = settings.bridge.port if port is None else port
        self.bound_port: int | None = None
        self._auth = _Auth(settings.bridge)
        self._max = settings.bridge.max_body_bytes
        self.header_timeout = settings.bridge.header_timeout
        self.body_timeout = settings.bridge.body_timeout
        self.max_connections = settings.bridge.max_connections
        self._open: dict[asyncio.Protocol, _Connection] = {}  # aiohttp's protocol → our wrapper
        self._retry_after = str(max(1, math.ceil(settings.amqp.reconnect_interval)))
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._channel: AbstractChannel | None = None  # the publisher's confirming channel
        self._runner: web.AppRunner | None = None

    @property
    def ready(self) -> bool:
        """True while the broker connection (and the publishing channel) is open."""
        conn, channel = self._connection, self._channel
        return (
            conn is not None and channel is not None and conn.connected.is_set()
            and not conn.is_closed and not channel.is_closed
        )

    def app(self) -> web.Application:
        # client_max_size is a backstop only: the handler enforces the limit while streaming.
        app = web.Application(client_max_size=self._max + 1, middlewares=[self._pace, self._observe])
        app.router.add_post("/alerts", self._alerts)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> int:
        """Check it may listen, connect, check the exchange (passively), bind.

        Raises ``StartRefused`` (listening beyond loopback without credentials, or no
        ``agentjobs.incidents`` exchange yet), ``TemporaryError`` if the broker is down.
        """
        if refusal := listen_refusal(self.host, self.port, self.settings.bridge):
            raise StartRefused(refusal, "give Alertmanager credentials (bridge.bearer_token) or listen on loopback")
        amqp = self.settings.amqp
        self._connection = await connect(amqp, name=self.name)
        try:
            await self._check_exchange()
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._publisher = Publisher(self._channel, timeout=amqp.publish_timeout, user_id=broker_user(amqp.url))
        except (TemporaryError, StartRefused):
            await self._close_connection()
            raise
        except Exception as exc:  # broker errors while checking: same meaning as a failed connect
            await self._close_connection()
            raise TemporaryError(f"cannot open a RabbitMQ channel: {exc!r}") from exc
        # In-flight requests wait for their confirm on stop, at most one publish timeout. An
        # unread body is drained at most _LINGER seconds (less than a header timeout) before closing.
        self._runner = web.AppRunner(
            self.app(), access_log=None, shutdown_timeout=amqp.publish_timeout + 1,
            lingering_time=min(_LINGER, self.header_timeout / 2),
            keepalive_timeout=2 * self.header_timeout)  # a backstop: _Connection closes first
        await self._runner.setup()
        site = _Site(self._runner, self, self.host, self.port)
        await site.start()
        self.bound_port = site.bound_port
        log.info("bridge_started", host=self.host, port=self.bound_port, auth=self._auth.required,
                 user=broker_user(amqp.url), max_body_bytes=self._max, header_timeout=self.header_timeout,
                 body_timeout=self.body_timeout, max_connections=self.max_connections)
        return self.bound_port

    async def _check_exchange(self) -> None:
        """A passive declare of ``agentjobs.incidents`` (no configure permission needed: the
        bridge's user has none); its absence is a StartRefused, not something to create."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            await channel.get_exchange(INCIDENTS, ensure=True)
        except ChannelNotFoundEntity:
            raise StartRefused(
                f"exchange {INCIDENTS} does not exist on the broker's vhost",
                "the dispatcher declares the topology: start `agentjobs dispatcher` (or `agentjobs up`) first",
            ) from None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (their confirms), then close the connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for conn in list(self._open.values()):  # aiohttp closed them; their timers go too
            conn.close()
        await self._close_connection()
        log.info("bridge_stopped")

    async def _close_connection(self) -> None:
        if self._connection is not None:
            try:
                await self._connection.close()
            except Exception as exc:  # noqa: BLE001 - closing a broken connection must not fail stop()
                log.warning("bridge_close_failed", error=repr(exc))
            self._connection = None
            self._publisher = None
            self._channel = None

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; exit 2 when the broker is unreachable at start."""
        from dispatcher.plumbing.signals import stop_event

        stop = stop_event()
        try:
            await self.start()
        except StartRefused as exc:
            log.error("bridge_start_refused", error=exc.message, hint=exc.hint)
            await self.stop()
            return 2
        except TemporaryError as exc:
            log.error("bridge_start_failed", error=exc.message,
                      hint="start RabbitMQ (Debian package rabbitmq-server, or "
                           "`docker run -p 5672:5672 rabbitmq:3-management`) or set amqp.url")
            await self.stop()
            return 2
        except OSError as exc:
            log.error("bridge_start_failed", error=f"cannot listen on {self.host}:{self.port}: {exc}",
                      hint="choose another bridge.port (AGENTJOBS_BRIDGE__PORT)")
            await self.stop()
            return 2
        await stop.wait()
        await self.stop()
        return 0

    # ------------------------------------------------------------------ the one response path

    def _admit(self, conn: _Connection) -> asyncio.Protocol | None:
        """aiohttp's protocol for a new connection, or None (counted, logged) when at the cap."""
        if len(self._open) >= self.max_connections or self._runner is None or self._runner.server is None:
            self._connection_refused(conn.log, "too_many_connections", status=503, open=len(self._open),
                                     max_connections=self.max_connections)
            return None
        inner = self._runner.server()
        self._open[inner] = conn
        self.metrics.connections_open.set(len(self._open))
        return inner

    def _release(self, inner: asyncio.Protocol) -> None:
        self._open.pop(inner, None)
        self.metrics.connections_open.set(len(self._open))

    def _connection_refused(self, logger: Any, reason: str, **fields: Any) -> None:
        self.metrics.connections_refused.labels(reason).inc()
        logger.warning("connection_refused", reason=reason, **fields)

    @web.middleware
    async def _pace(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The request's head is in: stop its connection's header timer; restart it after the answer."""
        conn = self._open.get(request.protocol)
        if conn is not None:
            conn.request_started()
        try:
            return await handler(request)
        finally:
            if conn is not None:
                conn.request_finished(drained=request.content.is_eof())

    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every 4xx of any route, ours or aiohttp's (404, 405), is logged and counted here."""
        started = time.monotonic()
        try:
            response = await handler(request)
        except _Refused as refused:
            self._refused(request, refused.response.status, refused.reason, started, refused.fields)
            return refused.response
        except web.HTTPException as exc:
            if 400 <= exc.status < 500:
                reason = _AIOHTTP_REASONS.get(exc.status, f"http_{exc.status}")
                self._refused(request, exc.status, reason, started)
            raise
        if 400 <= response.status < 500:  # a handler that returned a 4xx without _Refused
            self._refused(request, response.status, f"http_{response.status}", started)
        return response

    def _refused(self, request: web.Request, status: int, reason: str, started: float,
                 fields: dict[str, Any] | None = None) -> None:
        self.metrics.refused.labels(reason).inc()
        extra: dict[str, Any] = dict(fields or {})
        if forwarded := request.headers.get("X-Forwarded-For"):
            extra["forwarded_for"] = _client_text(forwarded)  # as sent: a hint, never trusted
        if status == 401:
            extra["auth_scheme"] = _auth_scheme(request.headers.get("Authorization"))
        # Alertmanager does not retry a 4xx: the notification is lost until its config is fixed.
        log.warning("request_refused", status=status, reason=reason, remote=request.remote,
                    method=request.method, path=_client_text(request.path),
                    duration_ms=round((time.monotonic() - started) * 1000, 1), **extra)

    # ------------------------------------------------------------------ handlers

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready = self.ready
        return web.json_response({"ready": ready, "checks": {"broker": ready}}, status=200 if ready else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _read_limited(self, request: web.Request) -> bytes | None:
        """The body, or None as soon as it exceeds the limit (never buffers more than limit + a chunk).

        All of it within ``body_timeout`` (a body trickled a byte at a time is a 408, and closed).
        """
        if request.content_length is not None and request.content_length > self._max:
            return None
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
                while chunk := await request.content.read(_READ_CHUNK):
                    size += len(chunk)
                    if size > self._max:
                        return None
                    parts.append(chunk)
        except TimeoutError:
            response = _error(408, "body_timeout", f"request body not received within {self.body_timeout:g} s",
                              headers={"Connection": "close"})
            raise _Refused(response, "body_timeout", bytes=size) from None
        return b"".join(parts)

    async def _alerts(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        response, fields = await self._handle(request)  # a 4xx raises _Refused: _observe logs it
        log.info(
            "alert_forwarded" if response.status == 200 else "alert_rejected",
            status=response.status, remote=request.remote, duration_ms=round((time.monotonic() - started) * 1000, 1),
            **fields,
        )
        return response

    async def _handle(self, request: web.Request) -> tuple[web.Response, dict[str, Any]]:
        if not self._auth.check(request.headers.get("Authorization")):
            response = _error(401, "unauthorized", "missing or wrong credentials")
            for challenge in self._auth.challenge():
                response.headers.add("WWW-Authenticate", challenge)
            raise _Refused(response, "unauthorized")
        body = await self._read_limited(request)
        if body is None:
            # Closing is cheaper than draining an oversized body we will not use.
            response = _error(413, "too_large", f"request body exceeds {self._max} bytes",
                              headers={"Connection": "close"})
            raise _Refused(response, "too_large")
        try:
            event = decode_incident(body, max_bytes=self._max)
        except DecodeError as exc:
            status = 413 if exc.reason == "too_large" else 400
            response = _error(status, exc.reason, exc.message)
            raise _Refused(response, exc.reason, bytes=len(body)) from None
        key = routing_key(event)
        fields: dict[str, Any] = {"routing_key": key, "event_id": event.event_id, "group_key": event.group_key,
                                  "alerts": len(event.alerts), "bytes": len(body)}
        publisher = self._publisher
        if publisher is None or not self.ready:
            self.metrics.unavailable.labels(reason="broker_down").inc()
            return self._unavailable("RabbitMQ connection is down; retry later"), {**fields, "reason": "broker_down"}
        try:
            await publisher.publish(INCIDENTS, key, body, message_id=event.event_id,
                                    headers={"x-agentjobs-received-by": "bridge"})
        except TemporaryError as exc:
            self.metrics.unavailable.labels(reason="not_confirmed").inc()
            return self._unavailable(exc.message), {**fields, "reason": "not_confirmed", "error": exc.message}
        self.metrics.forwarded.inc()
        return web.json_response({"status": "accepted", "event_id": event.event_id, "routing_key": key}), fields

    def _unavailable(self, message: str) -> web.Response:
        return _error(503, "broker_unavailable", message, headers={"Retry-After": self._retry_after})
