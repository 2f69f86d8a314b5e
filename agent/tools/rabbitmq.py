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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .toolbox import ParamError, describe_error, failure, redact, unknown_operation

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
    """Queue depth and consumers on one broker, any vhost, as ``username`` (the agent's Vault-issued user)."""

    name: ClassVar[str] = "rabbitmq"
    credential_domain: ClassVar[str | None] = "rabbitmq"

    def __init__(self, amqp_url: str, *, username: str | None = None, password: str | None = None,
                 limits: Limits | None = None, connection_name: str = "agentjobs-agent rabbitmq tool") -> None:
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

    def operations(self) -> Mapping[str, OperationSpec]:
        return OPERATIONS

    async def close(self) -> None:
        pass  # nothing stays open between calls

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
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


def _reply(exc: BaseException) -> str:
    """The broker's reply text of a refused login or channel, if the client kept it."""
    args = [str(a) for a in getattr(exc, "args", ()) if a]
    return " ".join(" ".join(args).split())[:300] or type(exc).__name__
