"""The ``rabbitmq`` tool: a queue's ready messages and consumers, read over AMQP.

What an on-call engineer checks first when a queue backs up: how many messages
wait for delivery and whether anything consumes them. A *passive*
``queue.declare`` answers both (``message_count`` = ready messages,
``consumer_count``) and needs no configure, write or read permission — only
access to the vhost — so it works as the agent's own Vault-issued broker user
(the one it publishes results with) and without the management plugin.

The broker is the one in the Job's ``AGENTJOBS_AMQP__URL``; only the vhost is
replaced by the one asked about (percent-encoded, ``/`` included). A missing
queue (``NOT_FOUND`` closes the channel), a refused vhost or login, an
unreachable broker and a timeout are failed observations with the reason, never
exceptions. Connecting, declaring and closing are bounded by ``Limits.timeout``.
A connection is opened per call and closed after it: calls are few, and nothing
is left open on a broker that is in trouble. The password never appears in an
observation.

With a management URL (``AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL``) the tool
also asks the management HTTP API what an on-call SRE asks a broker first:
``overview`` (memory/disk alarms per node, object totals, message rates),
``queues`` (ready, unacked, consumers, rates, idle since — backed-up first),
``queue`` (one queue with its consumers' prefetch and their channels' unacked
messages) and ``connections`` (publishers held by flow control or an alarm).
It authenticates as the same Vault-issued user; the management API answers it
because the Vault role gives it the ``monitoring`` tag (nodes, connections and
channels of every vhost; queues only of the vhosts it has permissions on).
Management statistics are sampled (every 5 s by default): counts lag a little,
rates are per second over the last samples. Each operation is bounded by one
``Limits.timeout``, reads at most ``Limits.max_bytes`` per answer and keeps at
most ``Limits.max_rows`` rows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .toolbox import BodyTooLarge, ParamError, describe_error, failure, read_capped, redact, unknown_operation

MAX_NAME_BYTES = 255  # AMQP short strings: queue and vhost names are at most this long (UTF-8)

OPERATIONS: dict[str, OperationSpec] = {
    "queue_status": OperationSpec(
        name="queue_status",
        description="One queue's ready messages (waiting for delivery) and its number of consumers, from a "
                    "passive queue.declare on the broker; fails with NOT_FOUND if the queue does not exist.",
        parameters={"type": "object", "additionalProperties": False, "required": ["queue"],
                    "properties": {
                        "queue": {"type": "string", "description": "the queue's name"},
                        "vhost": {"type": "string",
                                  "description": "the queue's vhost (default: the agent's own vhost)"},
                    }},
    ),
}


_VHOST = {"type": "string", "description": "the vhost (default: every vhost the user may see)"}
MANAGEMENT_OPERATIONS: dict[str, OperationSpec] = {
    "overview": OperationSpec(
        name="overview",
        description="The broker's health from its management API: per node the memory and disk alarms "
                    "(mem_used vs mem_limit, disk_free vs disk_free_limit), object totals (connections, "
                    "channels, queues, consumers), ready/unacked totals and message rates per second.",
        parameters={"type": "object", "additionalProperties": False, "properties": {}},
    ),
    "queues": OperationSpec(
        name="queues",
        description="Queues sorted by ready messages (most first): ready, unacked, consumers, "
                    "consumer_utilisation, publish/deliver/ack rates and the growth of ready per second, state "
                    "and idle_since; optionally one vhost and/or names containing a string.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"vhost": _VHOST,
                                   "name": {"type": "string", "description": "only queues whose name contains "
                                                                             "this"}}},
    ),
    "queue": OperationSpec(
        name="queue",
        description="One queue as in 'queues', plus its consumers (channel, prefetch_count, ack_required, "
                    "active) and their channels' unacked messages and prefetch: whether every consumer's "
                    "prefetch window is full.",
        parameters={"type": "object", "additionalProperties": False, "required": ["queue"],
                    "properties": {"queue": {"type": "string", "description": "the queue's name"},
                                   "vhost": {"type": "string",
                                             "description": "the queue's vhost (default: the agent's own vhost)"}}},
    ),
    "connections": OperationSpec(
        name="connections",
        description="Connections held by the broker: state blocked or blocking (an alarm stops publishers) or "
                    "flow (credit flow control throttles a publisher), with user, client name, vhost and peer.",
        parameters={"type": "object", "additionalProperties": False, "properties": {"vhost": _VHOST}},
    ),
}
HELD_STATES = ("blocked", "blocking", "flow")  # connection states of a publisher the broker holds back
MAX_CHANNELS = 20  # channels of one queue's consumers looked up (one request each)


def _rate(doc: Any, key: str) -> float | None:
    """``doc[key]["rate"]`` as a float (messages per second), None when the broker has no sample (pure)."""
    details = doc.get(key) if isinstance(doc, Mapping) else None
    value = details.get("rate") if isinstance(details, Mapping) else None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) else None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def queue_row(doc: Any) -> dict[str, Any]:
    """One queue of the management API reduced to what diagnosis needs (pure)."""
    q = doc if isinstance(doc, Mapping) else {}
    stats = q.get("message_stats") if isinstance(q.get("message_stats"), Mapping) else {}
    utilisation = q.get("consumer_utilisation")
    return {
        "vhost": str(q.get("vhost", "")), "name": str(q.get("name", "")), "type": str(q.get("type") or ""),
        "state": str(q.get("state") or ""), "messages_ready": _count(q.get("messages_ready")),
        "messages_unacknowledged": _count(q.get("messages_unacknowledged")), "consumers": _count(q.get("consumers")),
        "consumer_utilisation": float(utilisation) if isinstance(utilisation, int | float) else None,
        "publish_rate": _rate(stats, "publish_details"), "deliver_rate": _rate(stats, "deliver_get_details"),
        "ack_rate": _rate(stats, "ack_details"), "ready_rate": _rate(q, "messages_ready_details"),
        "idle_since": str(q.get("idle_since") or ""),
    }


def consumer_row(doc: Any) -> dict[str, Any]:
    """One entry of a queue's ``consumer_details`` (pure)."""
    c = doc if isinstance(doc, Mapping) else {}
    channel = c.get("channel_details") if isinstance(c.get("channel_details"), Mapping) else {}
    return {"channel": str(channel.get("name", "")), "connection": str(channel.get("connection_name", "")),
            "user": str(channel.get("user", "")), "consumer_tag": str(c.get("consumer_tag", "")),
            "prefetch_count": _count(c.get("prefetch_count")), "ack_required": bool(c.get("ack_required", True)),
            "active": bool(c.get("active", True))}


def channel_row(doc: Any) -> dict[str, Any]:
    """One channel of the management API: its unacked messages and prefetch (pure)."""
    ch = doc if isinstance(doc, Mapping) else {}
    stats = ch.get("message_stats") if isinstance(ch.get("message_stats"), Mapping) else {}
    return {"name": str(ch.get("name", "")), "user": str(ch.get("user", "")), "state": str(ch.get("state") or ""),
            "prefetch_count": _count(ch.get("prefetch_count")),
            "global_prefetch_count": _count(ch.get("global_prefetch_count")),
            "messages_unacknowledged": _count(ch.get("messages_unacknowledged")),
            "consumer_count": _count(ch.get("consumer_count")), "deliver_rate": _rate(stats, "deliver_get_details"),
            "ack_rate": _rate(stats, "ack_details")}


def node_row(doc: Any) -> dict[str, Any]:
    """One node's alarms and the figures behind them (pure)."""
    n = doc if isinstance(doc, Mapping) else {}
    return {"name": str(n.get("name", "")), "running": bool(n.get("running", True)),
            "mem_alarm": bool(n.get("mem_alarm")), "disk_free_alarm": bool(n.get("disk_free_alarm")),
            "mem_used": _count(n.get("mem_used")), "mem_limit": _count(n.get("mem_limit")),
            "disk_free": _count(n.get("disk_free")), "disk_free_limit": _count(n.get("disk_free_limit"))}


def connection_row(doc: Any) -> dict[str, Any]:
    """One connection: who, from where, in which state (pure)."""
    c = doc if isinstance(doc, Mapping) else {}
    props = c.get("client_properties") if isinstance(c.get("client_properties"), Mapping) else {}
    return {"name": str(c.get("name", "")), "user": str(c.get("user", "")), "vhost": str(c.get("vhost", "")),
            "client_name": str(props.get("connection_name") or ""), "state": str(c.get("state") or ""),
            "peer_host": str(c.get("peer_host") or ""), "peer_port": _count(c.get("peer_port"))}


def _fmt_rate(rate: float | None) -> str:
    return "?" if rate is None else f"{rate:.3g}/s"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def queue_line(q: Mapping[str, Any]) -> str:
    """One queue in one line, for excerpts (pure)."""
    line = (f"queue {q['name']!r} in vhost {q['vhost']!r}: ready={q['messages_ready']} "
            f"unacked={q['messages_unacknowledged']} consumers={q['consumers']} state={q['state'] or '?'} "
            f"publish={_fmt_rate(q['publish_rate'])} deliver={_fmt_rate(q['deliver_rate'])} "
            f"ack={_fmt_rate(q['ack_rate'])} ready_growth={_fmt_rate(q['ready_rate'])}")
    if q.get("consumer_utilisation") is not None:
        line += f" consumer_utilisation={q['consumer_utilisation']:.2f}"
    return line + (f" idle_since={q['idle_since']}" if q.get("idle_since") else "")


def node_line(n: Mapping[str, Any]) -> str:
    """One node's alarms in one line (pure)."""
    mem = "MEMORY ALARM" if n["mem_alarm"] else "no memory alarm"
    disk = "DISK ALARM" if n["disk_free_alarm"] else "no disk alarm"
    return (f"node {n['name']}: {mem} (mem_used {_fmt_bytes(n['mem_used'])} of limit {_fmt_bytes(n['mem_limit'])}), "
            f"{disk} (disk_free {_fmt_bytes(n['disk_free'])}, limit {_fmt_bytes(n['disk_free_limit'])})"
            + ("" if n["running"] else ", NOT RUNNING"))


def management_base(url: str) -> str:
    """The management URL without credentials or a trailing slash (pure): the agent's own user authenticates."""
    parts = urlsplit(url.strip())
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], path=parts.path.rstrip("/"),
                                     query="", fragment=""))


class ManagementRefused(Exception):
    """The management API answered with an error status; the message is the one-line reason."""


def vhost_of(amqp_url: str) -> str:
    """The vhost an AMQP URL names (``/`` when its path is empty), as the broker client reads it (pure)."""
    from yarl import URL

    path = URL(amqp_url).raw_path
    return unquote(path[1:]) if len(path) > 1 else "/"


def vhost_url(amqp_url: str, vhost: str, *, username: str | None = None, password: str | None = None) -> str:
    """``amqp_url`` pointed at ``vhost`` (percent-encoded), with the user inserted if given (pure; keep it out of
    logs)."""
    from yarl import URL

    base = URL(amqp_url)
    url = base.with_path("/" + quote(vhost, safe=""), encoded=True)
    if base.query_string:  # connection options (heartbeat, TLS files) stay as they are
        url = url.with_query(base.query)
    if username is not None:
        url = url.with_user(username).with_password(password or "")
    return str(url)


def _name(params: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = params.get(key)
    if value is None or (isinstance(value, str) and not value):
        if default is not None:
            return default
        raise ParamError(f"parameter {key!r} is required")
    if not isinstance(value, str):
        raise ParamError(f"parameter {key!r} must be a string")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ParamError(f"parameter {key!r} is longer than {MAX_NAME_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ParamError(f"parameter {key!r} contains control characters")
    return value


class RabbitMQTool:
    """Queue depth and consumers on one broker, any vhost, as ``username`` (the agent's Vault-issued user); with
    ``management_url`` also alarms, queue rates, consumers' prefetch windows and held connections."""

    name: ClassVar[str] = "rabbitmq"
    credential_domain: ClassVar[str | None] = "rabbitmq"

    def __init__(self, amqp_url: str, *, username: str | None = None, password: str | None = None,
                 limits: Limits | None = None, connection_name: str = "agentjobs-agent rabbitmq tool",
                 management_url: str = "") -> None:
        from yarl import URL

        self.amqp_url = amqp_url
        self.limits = limits or Limits()
        self.default_vhost = vhost_of(amqp_url)
        self._username, self._password = username, password
        url = URL(amqp_url)
        self._user = username if username is not None else (url.user or "guest")
        self._where = f"{url.host or '127.0.0.1'}:{url.port or 5672}"
        in_url = password if username is not None else url.password
        self._secrets = [s for s in {in_url or "", quote(in_url or "", safe="")} if s]
        self._connection_name = connection_name
        # The management API, as the same user; empty: only the AMQP operation is offered.
        self.management_url = management_base(management_url) if management_url.strip() else ""
        token = base64.b64encode(f"{self._user}:{in_url or ''}".encode()).decode("ascii")
        self._secrets.append(token)
        self._auth = {"Authorization": f"Basic {token}"}
        self._session: Any = None  # aiohttp.ClientSession, opened on the first management call
        self._operations = {**OPERATIONS, **MANAGEMENT_OPERATIONS} if self.management_url else OPERATIONS

    def operations(self) -> Mapping[str, OperationSpec]:
        return self._operations

    async def close(self) -> None:
        if self._session is not None:  # AMQP connections never stay open between calls
            await self._session.close()
            self._session = None

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in self._operations:
            return unknown_operation(self.name, operation, self._operations)
        if operation in MANAGEMENT_OPERATIONS:
            return await self._management(operation, params)
        try:
            queue = _name(params, "queue")
            vhost = _name(params, "vhost", self.default_vhost)
        except ParamError as exc:
            return failure(self.name, operation, "", f"invalid parameters: {exc}")
        query = f"queue.declare(queue={queue!r}, passive=True) in vhost {vhost!r} on {self._where}"
        import aio_pika  # an agent that never inspects a queue does not need it loaded
        import aiormq

        try:
            async with asyncio.timeout(self.limits.timeout):
                ready, consumers = await self._declare_passive(aio_pika, vhost, queue)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return self._failed(query, f"queue {queue!r} not found in vhost {vhost!r} (NOT_FOUND): it does not "
                                       "exist (deleted, or never declared)")
        except aiormq.exceptions.ChannelAccessRefused as exc:
            return self._failed(query, f"access to queue {queue!r} in vhost {vhost!r} refused for user "
                                       f"{self._user!r} (ACCESS_REFUSED): {_reply(exc)}")
        except aiormq.exceptions.ChannelLockedResource:
            return self._failed(query, f"queue {queue!r} in vhost {vhost!r} is exclusive to another connection "
                                       "(RESOURCE_LOCKED): its status cannot be read")
        except aiormq.exceptions.ProbableAuthenticationError as exc:
            return self._failed(query, f"login to {self._where} refused for user {self._user!r} "
                                       f"(ACCESS_REFUSED): {_reply(exc)}")
        except (aiormq.exceptions.InvalidFrameError, aiormq.exceptions.ConnectionNotAllowed):
            # RabbitMQ closes the connection instead of opening the vhost; the client keeps no reason.
            return self._failed(query, f"access to vhost {vhost!r} refused for user {self._user!r}: the vhost "
                                       "does not exist or the user has no permissions on it")
        except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError, ConnectionError, OSError,
                TimeoutError, RuntimeError) as exc:
            reason = describe_error(exc, self.limits.timeout)
            return self._failed(query, f"queue {queue!r} in vhost {vhost!r} on {self._where}: {reason}")
        data = {"vhost": vhost, "queue": queue, "message_count": ready, "consumer_count": consumers}
        excerpt = (f"queue {queue!r} in vhost {vhost!r}: {ready} ready message(s), {consumers} consumer(s)"
                   f" (passive declare as {self._user!r})")
        return Observation(tool=self.name, operation=operation, query=query, ok=True, at=utcnow(), data=data,
                           excerpt=bounded(redact(excerpt, self._secrets)))

    async def _declare_passive(self, aio_pika: Any, vhost: str, queue: str) -> tuple[int, int]:
        url = vhost_url(self.amqp_url, vhost, username=self._username, password=self._password)
        connection = await aio_pika.connect(url, timeout=self.limits.timeout,
                                            client_properties={"connection_name": self._connection_name})
        try:
            channel = await connection.channel(publisher_confirms=False)
            declared = await channel.declare_queue(queue, passive=True, timeout=self.limits.timeout)
            result = declared.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)
        finally:
            # The answer is in (or the call failed); closing is best effort and bounded.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=2)

    def _failed(self, query: str, reason: str) -> Observation:
        return failure(self.name, "queue_status", redact(query, self._secrets), reason, secrets=self._secrets)

    # --- the management API ------------------------------------------------------------------------

    async def _management(self, operation: str, params: Mapping[str, Any]) -> Observation:
        """One management operation within one ``Limits.timeout``; every failure is a failed observation."""
        import aiohttp

        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
        query = f"{operation}({shown}) on {self.management_url}"
        try:
            unknown = sorted(set(params) - set(MANAGEMENT_OPERATIONS[operation].parameters["properties"]))
            if unknown:
                raise ParamError(f"unknown parameter(s) {', '.join(unknown)}")
            handler = {"overview": self._overview, "queues": self._queues, "queue": self._queue,
                       "connections": self._connections}[operation]
            async with asyncio.timeout(self.limits.timeout):
                return await handler(params)
        except ParamError as exc:
            return failure(self.name, operation, query, f"invalid parameters: {exc}")
        except ManagementRefused as exc:
            return failure(self.name, operation, query, str(exc), secrets=self._secrets)
        except (TimeoutError, BodyTooLarge, aiohttp.ClientError, OSError, ValueError) as exc:
            return failure(self.name, operation, query,
                           f"management API {self.management_url}: {describe_error(exc, self.limits.timeout)}",
                           secrets=self._secrets)

    async def _get(self, path: str, params: Mapping[str, str] | None = None, *, missing: str = "") -> Any:
        """The JSON answer of ``GET path``; raises ``ManagementRefused`` with the reason for an error status."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._auth)
        url = self.management_url + path + (f"?{urlencode(params)}" if params else "")
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self.limits.timeout),
                                     allow_redirects=False) as resp:
            raw = await read_capped(resp, self.limits.max_bytes)
            status = resp.status
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            if status == 200:
                raise ValueError(f"HTTP {status}, not JSON: {raw[:200].decode('utf-8', 'replace')}") from None
            body = None
        if status == 200:
            return body
        reason = " ".join(str(body.get("reason") or body.get("error") or "").split())[:300] \
            if isinstance(body, Mapping) else ""
        if status == 404 and missing:
            raise ManagementRefused(f"{missing} (HTTP 404)")
        if status == 401:
            raise ManagementRefused(f"management API {self.management_url} refused user {self._user!r} (HTTP 401): "
                                    f"{reason or 'not authorised'} (the user needs the monitoring tag and "
                                    "permissions on the vhost)")
        raise ManagementRefused(f"management API {self.management_url}{path}: HTTP {status}"
                                + (f": {reason}" if reason else ""))

    def _vhost_param(self, params: Mapping[str, Any]) -> str | None:
        return _name(params, "vhost") if params.get("vhost") not in (None, "") else None

    async def _overview(self, params: Mapping[str, Any]) -> Observation:
        overview = await self._get("/api/overview")
        listed = await self._get("/api/nodes")
        nodes = [node_row(n) for n in (listed if isinstance(listed, list) else [])][: self.limits.max_rows]
        overview = overview if isinstance(overview, Mapping) else {}
        stats = overview.get("message_stats") if isinstance(overview.get("message_stats"), Mapping) else {}
        totals = overview.get("queue_totals") if isinstance(overview.get("queue_totals"), Mapping) else {}
        objects = overview.get("object_totals") if isinstance(overview.get("object_totals"), Mapping) else {}
        data = {
            "cluster_name": str(overview.get("cluster_name", "")),
            "rabbitmq_version": str(overview.get("rabbitmq_version", "")),
            "nodes": nodes,
            "alarms": [f"{kind} alarm on {n['name']}" for n in nodes
                       for kind, on in (("memory", n["mem_alarm"]), ("disk", n["disk_free_alarm"])) if on],
            "object_totals": {k: v for k, v in objects.items() if isinstance(v, int)},
            "queue_totals": {k: _count(totals.get(k)) for k in ("messages", "messages_ready",
                                                                 "messages_unacknowledged")},
            "message_rates": {k: _rate(stats, f"{k}_details") for k in ("publish", "deliver_get", "ack",
                                                                        "redeliver", "confirm")},
        }
        lines = [f"broker {data['cluster_name'] or '?'} (RabbitMQ {data['rabbitmq_version'] or '?'}): "
                 + ("ALARMS: " + ", ".join(data["alarms"]) if data["alarms"] else "no memory or disk alarm"),
                 *map(node_line, nodes),
                 "objects: " + ", ".join(f"{k}={v}" for k, v in sorted(data["object_totals"].items())),
                 "messages: " + ", ".join(f"{k}={v}" for k, v in data["queue_totals"].items()),
                 "rates: " + ", ".join(f"{k}={_fmt_rate(v)}" for k, v in data["message_rates"].items())]
        return self._observed("overview", "GET /api/overview; GET /api/nodes", data, lines)

    async def _queues(self, params: Mapping[str, Any]) -> Observation:
        vhost = self._vhost_param(params)
        name = _name(params, "name") if params.get("name") not in (None, "") else None
        path = "/api/queues" + (f"/{quote(vhost, safe='')}" if vhost is not None else "")
        # Sorted and cut by the broker: the busiest queues arrive first, whatever the broker holds.
        request = {"page": "1", "page_size": str(max(1, min(500, self.limits.max_rows))), "sort": "messages_ready",
                   "sort_reverse": "true", "columns": "name,vhost,type,state,messages_ready,messages_unacknowledged,"
                   "consumers,consumer_utilisation,message_stats,messages_ready_details,idle_since"}
        if name is not None:
            request |= {"name": name, "use_regex": "false"}
        missing = f"vhost {vhost!r} not found" if vhost is not None else ""
        page = await self._get(path, request, missing=missing)
        page = page if isinstance(page, Mapping) else {}
        found = [queue_row(q) for q in page.get("items") or []]
        found.sort(key=lambda q: -(q["messages_ready"] or 0))
        matched = _count(page.get("filtered_count"))
        matched = len(found) if matched is None else matched
        kept = found[: self.limits.max_rows]
        where = f"vhost {vhost!r}" if vhost is not None else "every vhost the user sees"
        data = {"vhost": vhost, "name": name, "matched": matched, "queues": kept}
        lines = [f"{matched} queue(s) in {where}" + (f" with {name!r} in their name" if name else "")
                 + (f", the {len(kept)} with most ready messages kept" if matched > len(kept) else "")
                 + " (most ready first)", *map(queue_line, kept)]
        query = f"GET {path}?{urlencode(request)}"
        return self._observed("queues", query, data, lines, truncated=matched > len(kept))

    async def _queue(self, params: Mapping[str, Any]) -> Observation:
        queue = _name(params, "queue")
        vhost = _name(params, "vhost", self.default_vhost)
        path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
        doc = await self._get(path,
                              missing=f"queue {queue!r} not found in vhost {vhost!r}: it does not exist (deleted, "
                                      "or never declared), or the vhost does not")
        row = queue_row(doc)
        consumers = [consumer_row(c) for c in (doc.get("consumer_details") or [] if isinstance(doc, Mapping) else [])]
        # consumer_details is live, the consumers count a sample: believe the larger.
        row["consumers"] = max(row["consumers"] or 0, len(consumers))
        channels = []
        for name in list(dict.fromkeys(c["channel"] for c in consumers if c["channel"]))[:MAX_CHANNELS]:
            try:
                channels.append(channel_row(await self._get(f"/api/channels/{quote(name, safe='')}")))
            except ManagementRefused:  # closed since: the consumers' own figures still stand
                continue
        row |= {"consumer_details": consumers[: self.limits.max_rows], "channels": channels,
                "prefetch_total": prefetch_window(consumers, channels)}
        lines = [queue_line(row)]
        lines += [f"consumer {c['consumer_tag']} on channel {c['channel']!r} (user {c['user']!r}): prefetch="
                  f"{c['prefetch_count']} ack_required={c['ack_required']} active={c['active']}"
                  for c in consumers[: self.limits.max_rows]]
        lines += [f"channel {ch['name']!r}: unacked={ch['messages_unacknowledged']} prefetch={ch['prefetch_count']} "
                  f"global_prefetch={ch['global_prefetch_count']} deliver={_fmt_rate(ch['deliver_rate'])} "
                  f"ack={_fmt_rate(ch['ack_rate'])}" for ch in channels]
        return self._observed("queue", f"GET {path}; GET /api/channels/<each consumer's channel>", row, lines,
                              truncated=len(consumers) > self.limits.max_rows)

    async def _connections(self, params: Mapping[str, Any]) -> Observation:
        vhost = self._vhost_param(params)
        path = f"/api/vhosts/{quote(vhost, safe='')}/connections" if vhost is not None else "/api/connections"
        request = {"columns": "name,user,vhost,state,client_properties,peer_host,peer_port"}
        docs = await self._get(path, request, missing=f"vhost {vhost!r} not found" if vhost is not None else "")
        every = [connection_row(c) for c in (docs if isinstance(docs, list) else [])]
        held = [c for c in every if c["state"] in HELD_STATES]
        kept = held[: self.limits.max_rows]
        where = f"vhost {vhost!r}" if vhost is not None else "the broker"
        data = {"vhost": vhost, "total": len(every), "held": len(held), "connections": kept}
        lines = [f"{len(held)} of {len(every)} connection(s) on {where} are blocked, blocking or in flow control",
                 *(f"connection {c['name']!r} ({c['client_name'] or 'no client name'}) of user {c['user']!r} in "
                   f"vhost {c['vhost']!r}: {c['state']}" for c in kept)]
        return self._observed("connections", f"GET {path}", data, lines, truncated=len(held) > len(kept))

    def _observed(self, operation: str, query: str, data: Any, lines: list[str], *, truncated: bool = False
                  ) -> Observation:
        return Observation(tool=self.name, operation=operation, query=redact(query, self._secrets), ok=True,
                           at=utcnow(), data=data, excerpt=bounded(redact("\n".join(lines), self._secrets)),
                           truncated=truncated)


def prefetch_window(consumers: list[dict[str, Any]], channels: list[dict[str, Any]] | None = None) -> int | None:
    """How many unacknowledged messages the consumers may hold in all: each consumer's prefetch_count, or its
    channel's global prefetch (basic.qos global) counted once per channel; None if a window is unlimited or
    unknown, or a consumer needs no acks (such a window never fills) (pure)."""
    if not consumers or not all(c["ack_required"] for c in consumers):
        return None
    shared = {ch["name"]: ch.get("global_prefetch_count") or 0 for ch in channels or []}
    total, counted = 0, set()
    for c in consumers:
        if c["prefetch_count"]:
            total += c["prefetch_count"]
        elif shared.get(c["channel"]):
            if c["channel"] not in counted:
                total += shared[c["channel"]]
                counted.add(c["channel"])
        else:
            return None
    return total


def _reply(exc: BaseException) -> str:
    """The broker's reply text of a refused login or channel, if the client kept it."""
    args = [str(a) for a in getattr(exc, "args", ()) if a]
    return " ".join(" ".join(args).split())[:300] or type(exc).__name__
